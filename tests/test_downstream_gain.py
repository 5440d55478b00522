"""Downstream gains (``calib.downstream``): what a relative error at each block's output costs
in the model's KL divergence, checked against rerunning the whole model with the noised block
and the evaluator's float64 KLD (``token_kld``)."""

from __future__ import annotations

import pytest
import torch

from llmquant.calib.downstream import (
    NOISE,
    DownstreamGain,
    kld_float32,
    relative_error,
    with_gains,
)
from llmquant.evaluate.metrics import token_kld


class _Block(torch.nn.Module):
    """x + an MLP's output (a decoder block's shape); ``scale`` sets how much it adds."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x / x.square().mean(-1, keepdim=True).sqrt()  # the block reads through an RMS norm
        return x + self.scale * self.down(torch.relu(self.up(h)))


@torch.no_grad()
def test_gains_equal_rerunning_the_whole_model_with_each_block_noised():
    torch.manual_seed(0)
    blocks = [_Block(s) for s in (0.3, 3.0, 10.0, 30.0)]
    head = torch.nn.Linear(32, 50)

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        return head(hidden / hidden.square().mean(-1, keepdim=True).sqrt())

    x = torch.randn(2, 9, 32)  # [windows, seq, hidden]
    states = [{k: v.clone() for k, v in b.state_dict().items()} for b in blocks]
    gain = DownstreamGain(x, seed=3)
    for i, block in enumerate(blocks):
        # the last block has nothing to allocate: no gain of its own, but it carries the others
        gain.step(i, block, {}, [block.up, block.down] if i < 3 else [])
    got = gain.gains(logits, chunk=3)  # chunks of 3 of 8 scored positions
    assert sorted(got) == [0, 1, 2]
    assert all(torch.equal(v, saved[k]) for b, saved in zip(blocks, states, strict=True)
               for k, v in b.state_dict().items())  # fmt: skip

    def run(noised: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, at_block = x, None
        for i, block in enumerate(blocks):
            if i == noised:
                clean = block(h)
                generator = torch.Generator().manual_seed(3 * 1_000_003 + i)
                saved = [m.weight.data for m in (block.up, block.down)]
                for m in (block.up, block.down):
                    rms = m.weight.square().mean(1, keepdim=True).sqrt()
                    m.weight.data = m.weight + NOISE * rms * torch.randn(
                        m.weight.shape, generator=generator)  # fmt: skip
                h = block(h)
                at_block = (h - clean, clean)
                block.up.weight.data, block.down.weight.data = saved
            else:
                h = block(h)
        return logits(h), *(at_block or (None, None))

    base, _, _ = run(None)
    for i in range(3):
        noised, delta, clean = run(i)
        want = float(token_kld(base, noised).mean()) / relative_error(delta, clean)
        assert got[i] == pytest.approx(want, rel=1e-4), i


def test_a_block_without_a_finite_gain_of_its_own_gets_the_median():
    info = [{"block": 0, "candidate_errors": {"a": {"Q4_0": 1.0}}},
            {"block": 1, "candidate_errors": {"b": {"Q4_0": 1.0}}},
            {"block": 2, "candidate_errors": {"c": {"Q4_0": 1.0}}},
            {"block": 3}]  # fmt: skip
    with_gains(info, {0: 1.0, 1: float("nan"), 2: 3.0})  # a NaN gain counts as missing
    assert [i.get("downstream_gain") for i in info] == [1.0, 1.0, 3.0, None]


def test_float32_kld_of_a_large_vocabulary_equals_float64():
    """Gemma's 262,144 logits, moved by about what a quantized block moves them: the float32
    divergence equals float64 log-softmax's to 1e-3, where float32 log-softmax's is off by
    more than that."""
    torch.manual_seed(0)
    base = 3 * torch.randn(2, 262_144)
    moved = base + 0.02 * torch.randn(2, 262_144)
    want = token_kld(torch.stack([base, base]).transpose(0, 1), torch.stack([moved, moved])
                     .transpose(0, 1))[:, 0]  # fmt: skip
    got = kld_float32(base, torch.softmax(base, dim=-1), moved)
    assert torch.allclose(got.double(), want, rtol=1e-3)
    lp, lq = torch.log_softmax(base, -1), torch.log_softmax(moved, -1)
    naive = (lp.exp() * (lp - lq)).sum(-1)
    assert not torch.allclose(naive.double(), want, rtol=1e-3)
