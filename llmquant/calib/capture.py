"""Catch the inputs of the decoder blocks and run one block over many batches.

Every block of the skeleton is replaced by a catcher that records its keyword arguments and
returns its input unchanged, so the base model's own forward builds the masks and position
embeddings for each block (Gemma-style models give sliding and global layers different ones)
while no block weight is needed.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from llmquant.model.stream import StreamedModel

# Keyword arguments that would make a block keep state between calls.
_DROPPED = {"past_key_values", "past_key_value", "use_cache", "output_attentions"}


class _Catcher(nn.Module):
    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        # Base models read per-layer attributes such as Gemma's attention_type.
        for attr in ("attention_type", "layer_idx", "is_sliding"):
            if hasattr(original, attr):
                setattr(self, attr, getattr(original, attr))
        self.hidden: torch.Tensor | None = None
        self.kwargs: dict = {}

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.hidden = hidden_states
        self.kwargs = kwargs
        return hidden_states


def sanitize_kwargs(block: nn.Module, kwargs: dict) -> dict:
    """Drop cache arguments and, when ``forward`` has no ``**kwargs``, the ones it does not take."""
    params = inspect.signature(block.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {k: v for k, v in kwargs.items() if k not in _DROPPED and (takes_any or k in params)}


@dataclass
class BlockInputs:
    """Hidden states of a set of windows, in batches, with the kwargs each block needs."""

    batches: list[torch.Tensor]  # each [batch, seq, hidden]
    kwargs: list[dict]  # per block; tensors broadcast over the batch dimension

    def clone(self) -> BlockInputs:
        return BlockInputs([b.clone() for b in self.batches], self.kwargs)

    @property
    def n_tokens(self) -> int:
        return sum(b.shape[0] * b.shape[1] for b in self.batches)


@torch.no_grad()
def capture_inputs(streamed: StreamedModel, windows: torch.Tensor, batch_size: int) -> BlockInputs:
    """Inputs of block 0 for ``windows`` [n, seq] and the kwargs of every block."""
    layers = streamed.layers
    originals = list(layers)
    catchers = [_Catcher(layer) for layer in originals]
    for i, catcher in enumerate(catchers):
        layers[i] = catcher
    base = streamed.base_model()
    batches: list[torch.Tensor] = []
    kwargs: list[dict] = []
    try:
        base(input_ids=windows[:1], use_cache=False)
        # Captured with batch 1 so masks and rotary tables broadcast to any batch.
        kwargs = [sanitize_kwargs(orig, c.kwargs) for orig, c in zip(originals, catchers)]
        for start in range(0, windows.shape[0], batch_size):
            base(input_ids=windows[start : start + batch_size], use_cache=False)
            batches.append(catchers[0].hidden.detach().clone())
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return BlockInputs(batches, kwargs)


@torch.no_grad()
def run_block(block: nn.Module, inputs: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    """The block's output for every batch of ``inputs``."""
    outputs = []
    for hidden in inputs:
        out = block(hidden, **kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs
