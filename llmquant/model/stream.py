"""A model skeleton whose parameters live on the ``meta`` device, filled one block at a time.

Peak memory is one decoder block plus the non-block modules (embeddings, final norm, lm_head),
whatever the model's size. Buffers (rotary frequencies) are built for real when the skeleton is
made, so only parameters ever stream. The non-block modules stay on the host; a loaded block
goes to ``device`` (a GPU when there is one), in the compute dtype.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from llmquant.dtypes import dtype_named
from llmquant.tensors import SafetensorsFolder, TensorSource

log = logging.getLogger(__name__)

def _assign(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_path, _, leaf = name.rpartition(".")
    module = root.get_submodule(module_path) if module_path else root
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:
        raise KeyError(f"model has no parameter or buffer {name!r}")


class StreamedModel:
    """A causal LM whose decoder blocks are loaded on demand from safetensors."""

    def __init__(
        self,
        folder: Path,
        dtype: str = "float32",
        layers_path: str = "model.layers",
        index: TensorSource | None = None,
        config: PretrainedConfig | None = None,
        device: torch.device | str = "cpu",
        outer_dtype: torch.dtype | None = None,
    ):
        """``dtype`` is the compute dtype; ``index`` replaces the folder's safetensors (e.g. a
        reader that dequantizes). ``outer_dtype`` (default: ``dtype``) is what the non-block
        modules are kept in: the checkpoint's dtype keeps a 70B model's embeddings at their
        stored size, and their outputs are cast to ``dtype`` (exactly, for a wider ``dtype``)."""
        self.folder = Path(folder)
        self.dtype = dtype if isinstance(dtype, torch.dtype) else dtype_named(dtype, "dtype")
        self.outer_dtype = outer_dtype or self.dtype
        self.device = torch.device(device)
        self.config: PretrainedConfig = config or AutoConfig.from_pretrained(self.folder)
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype)
        self.model.eval()
        self.model.requires_grad_(False)
        self.layers_path = layers_path
        try:
            self.layers: nn.ModuleList = self.model.get_submodule(layers_path)
        except AttributeError:
            from llmquant.model.arch import ARCHITECTURES, ArchError

            raise ArchError(
                f"{self.folder}: architecture {self.config.architectures} has no spec and no "
                f"{layers_path!r} block list; supported: {', '.join(sorted(ARCHITECTURES))}"
            ) from None
        self.index = index if index is not None else SafetensorsFolder(self.folder)
        self._load_non_block()

    @property
    def n_blocks(self) -> int:
        return len(self.layers)

    def block_numel(self, i: int = 0) -> int:
        """Parameters of block ``i`` (known from the skeleton, nothing loaded)."""
        return sum(p.numel() for p in self.layers[i].parameters())

    def non_block_numel(self) -> int:
        """Parameters outside the blocks (embeddings, final norm, an untied lm_head)."""
        return sum(p.numel() for p in self.model.parameters()) - sum(
            self.block_numel(i) for i in range(self.n_blocks)
        )

    def block_prefix(self, i: int) -> str:
        return f"{self.layers_path}.{i}."

    def _param_names(self, module: nn.Module, prefix: str) -> list[str]:
        names = [prefix + n for n, _ in module.named_parameters(remove_duplicate=False)]
        persistent = [
            prefix + n
            for n, _ in module.named_buffers()
            if prefix + n in self.index  # non-persistent buffers are computed, never stored
        ]
        return names + persistent

    def _load_non_block(self) -> None:
        block_root = self.layers_path + "."
        wanted = [
            n
            for n, _ in self.model.named_parameters(remove_duplicate=False)
            if not n.startswith(block_root)
        ]
        output = self.model.get_output_embeddings()
        tied = output is not None and output.weight is self.model.get_input_embeddings().weight
        present = [n for n in wanted if n in self.index]
        missing = [n for n in wanted if n not in self.index]
        state = self.index.load(present)
        for name, tensor in state.items():
            _assign(self.model, name, tensor.to(self.outer_dtype))
        if tied or (missing and all(n.endswith("lm_head.weight") for n in missing)):
            # Tied embeddings: one tensor stored, used as both input and output embedding.
            output.weight = self.model.get_input_embeddings().weight
            missing = [n for n in missing if not n.endswith("lm_head.weight")]
        if missing:
            raise KeyError(f"{self.folder}: weights missing for {missing[:5]}")

    def block_state(self, i: int) -> dict[str, torch.Tensor]:
        """The stored tensors of block ``i`` by full name (compute dtype)."""
        prefix = self.block_prefix(i)
        names = self._param_names(self.layers[i], prefix)
        return {k: v.to(self.dtype) for k, v in self.index.load(names).items()}

    def load_block(self, i: int, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """Materialize block ``i`` from the folder (or from ``state``, full names)."""
        block = self.layers[i]
        state = self.block_state(i) if state is None else state
        prefix = self.block_prefix(i)
        for name, tensor in state.items():
            _assign(block, name[len(prefix) :], tensor.to(device=self.device, dtype=self.dtype))
        if self.device.type != "cpu":
            block.to(self.device)  # computed buffers follow the parameters
        return block

    def free_block(self, i: int) -> None:
        """Send block ``i``'s parameters back to ``meta`` (computed buffers stay)."""
        for name, param in list(self.layers[i].named_parameters()):
            _assign(self.layers[i], name, torch.empty_like(param, device="meta"))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of ``ids`` [b, s] in the compute dtype: [b, s, hidden]."""
        return self.model.get_input_embeddings()(ids).to(self.dtype)

    def base_model(self) -> nn.Module:
        """The decoder stack (``model.model`` for most causal LMs)."""
        return self.model.get_submodule(self.layers_path.rsplit(".", 1)[0])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm, lm_head and logit soft-capping, as the causal LM's forward applies them."""
        hidden = hidden.to("cpu")  # the final norm and lm_head stay on the host
        norm = getattr(self.base_model(), "norm", None)
        if norm is not None:
            hidden = norm(hidden)
        output = self.model.get_output_embeddings()
        if output.weight.dtype == hidden.dtype:
            logits = output(hidden)
        else:
            logits = torch.nn.functional.linear(
                hidden, output.weight.to(hidden.dtype), getattr(output, "bias", None)
            )
        cap = getattr(self.config.get_text_config(), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
