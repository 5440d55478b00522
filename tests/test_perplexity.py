from __future__ import annotations

import math

import torch

from llmquant.evaluate.perplexity import summarize, token_nll


def test_token_nll_matches_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    got = token_nll(logits, ids)
    for b in range(2):
        for t in range(4):
            row = logits[b, t].double()
            expected = -(row[ids[b, t + 1]] - math.log(sum(math.exp(v) for v in row.tolist())))
            assert abs(got[b, t].item() - expected) < 1e-10


def test_summary_mean_and_standard_error():
    nll = torch.tensor([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]])
    res = summarize(nll)
    values = [1.0, 2.0, 3.0, 2.0, 2.0, 2.0]
    mean = sum(values) / 6
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 5)
    assert abs(res.nll - mean) < 1e-12
    assert abs(res.ppl - math.exp(mean)) < 1e-9
    assert abs(res.nll_se - sd / math.sqrt(6)) < 1e-12
    assert res.n_tokens == 6 and res.window_nll == [2.0, 2.0]
