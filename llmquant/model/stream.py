"""A model skeleton whose parameters live on the ``meta`` device, filled one block at a time.

Peak memory is one decoder block plus the non-block modules (embeddings, final norm, lm_head),
whatever the model's size. Buffers (rotary frequencies) are built for real when the skeleton is
made, so only parameters ever stream.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class WeightIndex:
    """Tensor name -> safetensors file of a Hugging Face folder (sharded or not)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: self.folder / v for k, v in weight_map.items()}
        else:
            self.files = {}
            for path in sorted(self.folder.glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        self.files[key] = path
        if not self.files:
            raise FileNotFoundError(f"{self.folder}: no safetensors weights found")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self) -> list[str]:
        return list(self.files)

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read ``names`` grouped by file, each file opened once."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.files:
                raise KeyError(f"{self.folder}: tensor {name!r} not found in the safetensors files")
            by_file.setdefault(self.files[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for path, keys in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for key in keys:
                    out[key] = f.get_tensor(key)
        return out


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
        index: WeightIndex | None = None,
        config: PretrainedConfig | None = None,
    ):
        """``index`` replaces the folder's safetensors (e.g. a reader that dequantizes)."""
        self.folder = Path(folder)
        self.dtype = DTYPES[dtype]
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
        self.index = index if index is not None else WeightIndex(self.folder)
        self._load_non_block()

    @property
    def n_blocks(self) -> int:
        return len(self.layers)

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
            _assign(self.model, name, tensor.to(self.dtype))
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
            _assign(block, name[len(prefix) :], tensor.to(self.dtype))
        return block

    def free_block(self, i: int) -> None:
        """Send block ``i``'s parameters back to ``meta`` (computed buffers stay)."""
        for name, param in list(self.layers[i].named_parameters()):
            _assign(self.layers[i], name, torch.empty_like(param, device="meta"))

    def base_model(self) -> nn.Module:
        """The decoder stack (``model.model`` for most causal LMs)."""
        return self.model.get_submodule(self.layers_path.rsplit(".", 1)[0])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm, lm_head and logit soft-capping, as the causal LM's forward applies them."""
        norm = getattr(self.base_model(), "norm", None)
        if norm is not None:
            hidden = norm(hidden)
        logits = self.model.get_output_embeddings()(hidden)
        cap = getattr(self.config.get_text_config(), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
