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

from llmquant.model.device import to_device
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
    """Inputs of block 0 for ``windows`` [n, seq] (on the host) and the kwargs of every block
    (on the blocks' device)."""
    layers = streamed.layers
    originals = list(layers)
    catchers = [_Catcher(layer) for layer in originals]
    for i, catcher in enumerate(catchers):
        layers[i] = catcher
    base = streamed.base_model()
    batches: list[torch.Tensor] = []
    kwargs: list[dict] = []

    def forward(ids: torch.Tensor) -> None:
        if streamed.outer_dtype == streamed.dtype:
            base(input_ids=ids, use_cache=False)
        else:  # embeddings kept narrower than the blocks compute in
            base(inputs_embeds=streamed.embed(ids), use_cache=False)

    try:
        forward(windows[:1])
        # Captured with batch 1 so masks and rotary tables broadcast to any batch.
        kwargs = [
            to_device(sanitize_kwargs(orig, c.kwargs), streamed.device)
            for orig, c in zip(originals, catchers)
        ]
        for start in range(0, windows.shape[0], batch_size):
            forward(windows[start : start + batch_size])
            batches.append(catchers[0].hidden.detach().clone())
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return BlockInputs(batches, kwargs)


@torch.no_grad()
def run_block(block: nn.Module, inputs: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    """The block's output for every batch of ``inputs``, each where its input batch lives
    (a host stream goes to the block's device one batch at a time)."""
    device = next(block.parameters()).device
    outputs = []
    for hidden in inputs:
        out = block(hidden.to(device, non_blocking=True), **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        outputs.append(out.to(hidden.device))
    return outputs
