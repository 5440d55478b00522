"""Evaluation jobs: several models against a named baseline on identical token windows.

The baseline's final hidden states are computed once per (baseline, windows) and cached on
disk; every candidate's logits are compared with the baseline's window by window, so nothing of
vocabulary size is kept for the whole text.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from pydantic import Field, ValidationError
from tqdm import tqdm
from transformers import AutoTokenizer

from llmquant.cache import cache_root, file_identity, publish
from llmquant.data import text as textdata
from llmquant.errors import InputError
from llmquant.evaluate.loaders import LlamaCppRunner, open_streamed
from llmquant.evaluate.metrics import Accumulator
from llmquant.evaluate.streamed import final_hidden, window_logits
from llmquant.formats import detect_format
from llmquant.model.device import DeviceName, resolve_compute_dtype, resolve_device
from llmquant.model.source import check_gguf, resolve_model
from llmquant.recipe import RecipeError, TextSource, format_errors, read_yaml_file
from llmquant.report import folder_bytes, versions
from llmquant.schema import Strict as _Strict
from llmquant.tensors import SafetensorsFolder, iter_tensors, language_config, read_config
from llmquant.values import check_perplexity, check_source

log = logging.getLogger(__name__)


class Windows(_Strict):
    n_windows: int = Field(8, ge=1)
    seq_len: int = Field(512, ge=8)
    batch_size: int = Field(4, ge=1)


class ModelEntry(_Strict):
    name: str
    path: str  # "default", a folder (HF / AutoAWQ / compressed-tensors) or a .gguf file
    # GGUF: also dequantize into torch, to separate format loss from runtime differences.
    dequantize: bool = False


class Tolerance(_Strict):
    ppl_rel: float = 0.002
    kld_abs: float = 0.002


class Job(_Strict):
    name: str
    text: TextSource = TextSource()
    windows: Windows = Windows()
    baseline: ModelEntry = ModelEntry(name="baseline", path="default")
    models: list[ModelEntry] = Field(default_factory=list)
    # A model made by llmquant whose calibration text overlaps the evaluation text is refused
    # unless this is set; then the result is flagged in the output.
    allow_calibration_overlap: bool = False
    tolerance: Tolerance = Tolerance()
    results: str | None = None  # committed results file that --check compares with
    # Where the torch models' blocks run (auto: the first GPU, else the CPU); float32 on the
    # CPU, bfloat16 on a GPU.
    device: DeviceName = "auto"


def load_job(path: str | Path) -> Job:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: evaluation job file not found")
    try:
        return Job.model_validate(read_yaml_file(path) or {})
    except ValidationError as err:
        raise RecipeError(format_errors(err, str(path), Job, "evaluation job")) from None


def _resolve_path(path: str) -> Path:
    return resolve_model(path) if path == "default" else Path(path)


def _check_paths(job: Job) -> None:
    """Every model of the job exists and is a format we read, before the baseline pass (which
    can take hours on a real model)."""
    entries = [("baseline", job.baseline)] + [
        (f"models[{k}]", model) for k, model in enumerate(job.models)
    ]
    for where, model in entries:
        if model.path == "default":
            continue
        path = Path(model.path).expanduser()
        if not path.exists():
            raise InputError(
                f"{where}.path {model.path!r} ({model.name}): no such file or folder "
                f"({path.absolute()})"
            )
        try:
            detect_format(path)
            # A cut or overwritten file is named now, not after the baseline pass.
            if path.is_file():
                check_gguf(path)
            else:
                SafetensorsFolder(path)  # reads every file's header
        except InputError as err:
            raise InputError(f"{where}.path ({model.name}): {err}") from None


def _model_folder(path: Path) -> Path:
    """The Hugging Face folder (config.json, tokenizer) behind ``path``: a GGUF file is
    converted once into the cache, as a ``model.source`` would be."""
    return resolve_model(str(path)) if path.is_file() else path


def evaluation_windows(job: Job, tokenizer_dir: Path) -> tuple[torch.Tensor, list[str]]:
    """The job's evaluation windows and the evaluation documents they come from."""
    text = job.text
    docs = textdata.load_documents(
        text.source, text.text_field, text.config_name, text.split, key="text.source"
    )
    _, evaluation = textdata.split_documents(docs, text.eval_fraction, text.seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    windows = textdata.make_windows(
        tokenizer, evaluation, job.windows.n_windows, job.windows.seq_len
    )
    return windows, evaluation


def run_report(model_path: Path) -> dict | None:
    """The llmquant ``report.json`` of the run that wrote ``model_path``, if there is one."""
    for folder in (model_path.parent, model_path.parent.parent):
        report = folder / "report.json"
        if report.is_file():
            return json.loads(report.read_text())
    return None


def calibration_overlap(model_path: Path, evaluation: list[str]) -> int | None:
    """Documents shared by the evaluation text and the calibration text of an llmquant run.

    None when the model has no llmquant report next to it (nothing to check against).
    """
    report = run_report(model_path)
    if report is None:
        return None
    data = TextSource.model_validate(report["recipe"]["data"])
    docs = textdata.load_documents(data.source, data.text_field, data.config_name, data.split)
    calibration, _ = textdata.split_documents(docs, data.eval_fraction, data.seed)
    return len(set(calibration) & set(evaluation))


def _open_checked(path: Path, job: Job):
    """The streamed torch model of ``path``, its stored weights checked finite first."""
    streamed, _ = open_streamed(path, *_runtime(job))
    check_source(iter_tensors(streamed.index), str(path))
    return streamed


def _baseline_hidden(job: Job, path: Path, windows: torch.Tensor):
    streamed = _open_checked(path, job)
    # Keyed on the baseline's files (size, mtime), not only its name: a replaced checkpoint
    # at the same path is never scored against the old one's cached states.
    identity = json.dumps(file_identity(path.resolve()))
    key = hashlib.sha256(
        (str(path.resolve()) + identity + str(windows.shape) + str(streamed.dtype)).encode()
        + windows.numpy().tobytes()
    ).hexdigest()[:20]
    cache = cache_root() / "eval" / f"baseline-{key}.pt"
    if cache.is_file():
        return streamed, torch.load(cache)
    batches = final_hidden(streamed, windows, job.windows.batch_size, desc="baseline")
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp")
    torch.save(batches, tmp)
    publish(tmp, cache)
    return streamed, batches


def _runtime(job: Job) -> tuple[torch.dtype, torch.device]:
    device = resolve_device(job.device, "device")
    return resolve_compute_dtype("auto", device), device


def _param_count(streamed) -> int:
    """Parameters of the model, a tied embedding counted once (the bits-per-weight divisor)."""
    return sum(p.numel() for p in streamed.model.parameters())


def run_job(job: Job) -> dict:
    """Evaluate every model of ``job`` against its baseline; returns the results document."""
    _runtime(job)  # a device that does not exist is bad input before any work
    _check_paths(job)
    base_path = _resolve_path(job.baseline.path)
    base_folder = _model_folder(base_path)
    context = language_config(read_config(base_folder)).get("max_position_embeddings")
    if isinstance(context, int) and job.windows.seq_len > context:
        raise RecipeError(
            f"windows.seq_len: {job.windows.seq_len} tokens is longer than the baseline's "
            f"context (max_position_embeddings {context} in {base_folder / 'config.json'})"
        )
    windows, evaluation = evaluation_windows(job, base_folder)
    entries: list[tuple[str, str, Path, str]] = []  # (name, kind, path, runtime)
    for model in job.models:
        path = _resolve_path(model.path)
        overlap = calibration_overlap(path, evaluation)
        if overlap and not job.allow_calibration_overlap:
            raise RecipeError(
                f"models[{model.name}]: {overlap} evaluation documents were in its calibration "
                "text; evaluate on another split or set allow_calibration_overlap: true"
            )
        if path.suffix == ".gguf":
            entries.append((model.name, "gguf", path, "llama.cpp"))
            if model.dequantize:
                entries.append((model.name + " (torch)", "gguf", path, "torch"))
        else:
            entries.append((model.name, "folder", path, "torch"))

    # Only now, with every model checked: the baseline pass is the long one.
    base_model, base_hidden = _baseline_hidden(job, base_path, windows)
    n_params = _param_count(base_model)

    def base_logits():
        return window_logits(base_model, base_hidden)

    results: dict = {
        "job": job.model_dump(mode="json"),
        "versions": versions(),
        "windows": {"n": int(windows.shape[0]), "seq_len": int(windows.shape[1])},
        "baseline": {"name": job.baseline.name, "path": str(base_path)},
        "models": {},
    }
    base_acc = Accumulator()
    for logits, ids in zip(base_logits(), windows.split(1)):
        base_acc.add(logits, ids, None)
    base_summary = base_acc.summary()
    check_perplexity(job.baseline.name, base_summary["ppl"])
    results["models"][job.baseline.name] = {
        **base_summary,
        "bpw": 8 * folder_bytes(base_path) / n_params,
        "bytes": folder_bytes(base_path),
        "runtime": "torch",
        "overlap": 0,
    }
    for name, _kind, path, runtime in entries:
        acc = Accumulator()
        if runtime == "llama.cpp":
            runner = LlamaCppRunner(path, n_ctx=windows.shape[1])
            try:
                logits_iter = runner.window_logits(windows)
                for logits, base, ids in tqdm(
                    zip(logits_iter, base_logits(), windows.split(1)),
                    total=len(windows),
                    desc=name,
                    leave=False,
                ):
                    acc.add(logits, ids, base)
            finally:
                runner.close()
        else:
            streamed = _open_checked(path, job)
            hidden = final_hidden(streamed, windows, job.windows.batch_size, desc=name)
            for logits, base, ids in zip(
                window_logits(streamed, hidden), base_logits(), windows.split(1)
            ):
                acc.add(logits, ids, base)
        summary = acc.summary()
        cause = "the GGUF file may hold non-finite values" if runtime == "llama.cpp" else None
        check_perplexity(name, summary["ppl"], cause)
        results["models"][name] = {
            **summary,
            "bpw": 8 * folder_bytes(path) / n_params,
            "bytes": folder_bytes(path),
            "runtime": runtime,
            "path": str(path),
            "overlap": calibration_overlap(path, evaluation) or 0,
            "recipe": (run_report(path) or {}).get("recipe"),
        }
    return results


def check(results: dict, committed: dict, tolerance: Tolerance) -> list[str]:
    """Drifts of ``results`` from ``committed`` beyond the tolerance, one line each."""
    problems = []
    for name, ref in committed["models"].items():
        got = results["models"].get(name)
        if got is None:
            problems.append(f"{name}: missing from the new results")
            continue
        rel = abs(got["ppl"] / ref["ppl"] - 1)
        if rel > tolerance.ppl_rel:
            problems.append(f"{name}: ppl {got['ppl']:.4f} vs {ref['ppl']:.4f} ({rel:.2%})")
        if "kld_mean" in ref:
            diff = abs(got.get("kld_mean", float("nan")) - ref["kld_mean"])
            if not diff <= tolerance.kld_abs:
                problems.append(f"{name}: kld {got.get('kld_mean')} vs {ref['kld_mean']}")
    return problems
