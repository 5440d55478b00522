"""Evaluate any streamable model block by block over all windows (memory: one block at a time).

The final hidden states of every window are computed one block at a time, so a model that does
not fit in memory still evaluates; logits are made one window at a time from those states.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from llmquant.calib.capture import capture_inputs, run_block
from llmquant.model.stream import StreamedModel


@torch.no_grad()
def final_hidden(
    streamed: StreamedModel, windows: torch.Tensor, batch_size: int = 4, desc: str = "evaluating"
) -> list[torch.Tensor]:
    """Last decoder block's output for ``windows`` [n, seq], as batches of [b, seq, hidden]."""
    inputs = capture_inputs(streamed, windows, batch_size)
    batches = inputs.batches
    for i in tqdm(range(streamed.n_blocks), desc=desc, unit="block", leave=False):
        block = streamed.load_block(i)
        batches = run_block(block, batches, inputs.kwargs[i])
        streamed.free_block(i)
    return batches


@torch.no_grad()
def window_logits(streamed: StreamedModel, batches: list[torch.Tensor]):
    """Yield logits [1, seq, vocab] one window at a time from final hidden batches."""
    for hidden in batches:
        for row in range(hidden.shape[0]):
            yield streamed.logits(hidden[row : row + 1])
