"""Checkpoints with exact resume: weights, optimizer, RNG states (torch, python, numpy), counters, data order.

Layout of ``<output_dir>/checkpoints/<name>/``:
    model.safetensors, config.json, generation_config.json   (state_dict names; from_pretrained loads it)
    processor / tokenizer files                                (when a processor is given: a usable model folder)
    optimizer.pt        optimizer.state_dict() (absent for model-only checkpoints)
    reference.safetensors  the frozen KL reference's weights, when beta > 0
    rng.pt              RNG states (rank 0's in a data-parallel run)
    rng_ranks.pt        every rank's RNG states, in rank order (data-parallel runs only)
    trainer_state.json  phase, step counters, data order, evaluation results, config
A tracker file ``<output_dir>/checkpoints/latest.json`` names the newest complete checkpoint; it is written
atomically *after* the checkpoint folder is complete, so a crash mid-save never leaves it pointing at a partial one.

Data-parallel runs (vitos_ext/trainer/distributed.py) write the same layout from rank 0: model weights are always the
full, unsharded state dict under the policy's own names (FSDP2 gathers them first), so any checkpoint loads into any
strategy or a plain model. The optimizer file of an FSDP2 run holds torch.distributed.checkpoint's full optimizer state
dict (keyed by parameter names) instead of ``optimizer.state_dict()``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..patching import inner_model

__all__ = [
    "check_lora_exportable",
    "merged_lora_state_dict",
    "save_model_folder",
    "TRACKER_FILE",
    "CheckpointInfo",
    "capture_rng_state",
    "restore_rng_state",
    "save_checkpoint",
    "load_checkpoint_weights",
    "read_tracker",
    "write_tracker",
]

TRACKER_FILE = "latest.json"
_STATE_FILE = "trainer_state.json"
_RANK_RNG_FILE = "rng_ranks.pt"


@dataclass(frozen=True)
class CheckpointInfo:
    """What the tracker file says: checkpoint folder (absolute), its trainer state."""

    path: Path
    state: dict[str, Any]


def capture_rng_state() -> dict[str, Any]:
    """torch (CPU and every CUDA device), python ``random`` and numpy global RNG states, torch.save-able with
    weights_only loading."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    python_version, python_state, python_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "python": [python_version, list(python_state), python_gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(position), int(has_gauss),
                  float(gauss)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` captured."""
    torch.set_rng_state(state["torch"])
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    processor=None,
    reference: torch.nn.Module | None = None,
    *,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    rng_states: list[dict[str, Any]] | None = None,
) -> Path:
    """Write a complete checkpoint folder (replacing one of the same name).

    Args:
        directory: the checkpoint folder.
        model: the policy (patched or not).
        state: JSON-serializable trainer state (counters, data order, config, evaluation results).
        optimizer: saved when given.
        processor: saved when given, so the folder is a standalone model directory.
        reference: the frozen KL reference model, saved when given.
        model_state: the weights to write instead of ``model.state_dict()`` (a gathered full state dict of a
            sharded model).
        optimizer_state: the optimizer state to write instead of ``optimizer.state_dict()``.
        rng_states: every rank's :func:`capture_rng_state`, in rank order (data-parallel runs); rng.pt then holds
            rank 0's.

    Returns:
        The folder path.
    """
    directory = Path(directory)
    staging = save_model_folder(directory.with_name(directory.name + ".partial"), model, processor, model_state)
    if optimizer_state is not None:
        torch.save(optimizer_state, staging / "optimizer.pt")
    elif optimizer is not None:
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    if reference is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in reference.state_dict().items()},
                  str(staging / "reference.safetensors"))
    if rng_states is not None:
        torch.save(rng_states[0], staging / "rng.pt")
        torch.save(list(rng_states), staging / _RANK_RNG_FILE)
    else:
        torch.save(capture_rng_state(), staging / "rng.pt")
    (staging / _STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(staging, directory)
    return directory


def _save_weights(model: torch.nn.Module, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Weights under the module's own state_dict names (exact round trip through load_state_dict) + config files.

    transformers' from_pretrained reads this folder too (current checkpoints use these names); save_pretrained
    is not used because it may rename keys to a legacy layout for some architectures. Tied tensors are stored once.
    ``state_dict`` replaces ``model.state_dict()`` (e.g. the gathered full weights of a sharded model).
    """
    tensors, seen = {}, set()
    for name, tensor in (state_dict if state_dict is not None else model.state_dict()).items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if tensor.device.type != "meta" and key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().contiguous().cpu()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(directory)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(directory)


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / name for name in names]
    single = directory / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"checkpoint {directory} has no model.safetensors")
    return [single]


def _load_state_dict_exact(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint {source} has weights the model does not: {unexpected[:5]}")
    # save_pretrained drops tied duplicates; anything else missing means another architecture
    loaded_storage = {p.data_ptr() for name, p in module.state_dict().items() if name in tensors}
    untied = [name for name in missing if module.state_dict()[name].data_ptr() not in loaded_storage]
    if untied:
        raise ValueError(f"checkpoint {source} lacks weights of the model: {untied[:5]}")


def load_checkpoint_weights(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    reference: torch.nn.Module | None = None,
    restore_rng: bool = True,
    *,
    rank: int = 0,
    load_model_state: Callable[[torch.nn.Module, dict[str, torch.Tensor]], Any] | None = None,
    load_optimizer_state: Callable[[torch.optim.Optimizer, dict[str, Any]], Any] | None = None,
) -> dict[str, Any]:
    """Load a checkpoint into existing objects (bit-exact) and return its trainer state.

    Args:
        directory: a folder written by :func:`save_checkpoint`.
        model: receives the weights (in place, so a patched model stays patched).
        optimizer: receives the optimizer state when given and present in the checkpoint.
        reference: receives the KL reference weights when given and present.
        restore_rng: restore the RNG states: this rank's from rng_ranks.pt when the checkpoint has them, else rng.pt.
        rank: this process's rank in a data-parallel run.
        load_model_state: loads the full weights into ``model`` instead of load_state_dict (a sharded model);
            returns load_state_dict's (missing, unexpected) key lists, which are checked the same way.
        load_optimizer_state: loads the optimizer file instead of ``optimizer.load_state_dict``.
    """
    directory = Path(directory)
    if not (directory / _STATE_FILE).is_file():
        raise FileNotFoundError(f"{directory} is not a complete checkpoint (no {_STATE_FILE})")
    tensors: dict[str, torch.Tensor] = {}
    for path in _weight_files(directory):
        tensors.update(load_file(str(path)))
    with torch.no_grad():
        if load_model_state is None:
            _load_state_dict_exact(model, tensors, directory)
        else:
            missing, unexpected = load_model_state(model, tensors)
            if unexpected:
                raise ValueError(f"checkpoint {directory} has weights the model does not: {list(unexpected)[:5]}")
            if missing:
                raise ValueError(f"checkpoint {directory} lacks weights of the model: {list(missing)[:5]}")
    if optimizer is not None and (directory / "optimizer.pt").is_file():
        optimizer_state = torch.load(directory / "optimizer.pt", weights_only=True)
        if load_optimizer_state is None:
            optimizer.load_state_dict(optimizer_state)
        else:
            load_optimizer_state(optimizer, optimizer_state)
    if reference is not None and (directory / "reference.safetensors").is_file():
        with torch.no_grad():
            _load_state_dict_exact(reference, load_file(str(directory / "reference.safetensors")), directory)
    if restore_rng:
        restore_rng_state(_rng_state_for_rank(directory, rank))
    return json.loads((directory / _STATE_FILE).read_text())


def _rng_state_for_rank(directory: Path, rank: int) -> dict[str, Any]:
    per_rank = directory / _RANK_RNG_FILE
    if per_rank.is_file():
        states = torch.load(per_rank, weights_only=True)
        if rank < len(states):
            return states[rank]
    return torch.load(directory / "rng.pt", weights_only=True)


def write_tracker(checkpoints_dir: str | os.PathLike, name: str, state: dict[str, Any]) -> None:
    """Point the tracker file at checkpoint ``name`` (atomic)."""
    checkpoints_dir = Path(checkpoints_dir)
    summary = {key: state.get(key) for key in ("phase", "phase_step", "global_step", "phase_complete",
                                                 "completed_phases")}
    _atomic_write(checkpoints_dir / TRACKER_FILE, json.dumps({"checkpoint": name, **summary}, indent=1) + "\n")


def read_tracker(checkpoints_dir: str | os.PathLike) -> CheckpointInfo | None:
    """The checkpoint the tracker names, or None when there is no tracker."""
    checkpoints_dir = Path(checkpoints_dir)
    tracker = checkpoints_dir / TRACKER_FILE
    if not tracker.is_file():
        return None
    name = json.loads(tracker.read_text())["checkpoint"]
    path = checkpoints_dir / name
    state_file = path / _STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"the tracker {tracker} names {path}, which is not a complete checkpoint")
    return CheckpointInfo(path=path, state=json.loads(state_file.read_text()))


def save_model_folder(directory: str | os.PathLike, model: torch.nn.Module, processor=None,
                      state_dict: dict[str, torch.Tensor] | None = None, merge_adapters: bool = False) -> Path:
    """A plain model folder (weights, config, generation config, processor) for inference / the demo, replacing
    any folder of that name; checkpoints start from one. ``state_dict`` replaces ``model.state_dict()`` (the
    gathered weights of a sharded model).

    With ``merge_adapters`` a PEFT LoRA policy is exported with its adapters merged into the weights (a folder that
    from_pretrained, the demo and ``vitos-ext infer`` load as the plain model), plus the adapter alone in
    ``adapter/`` (PEFT's format). Without it (checkpoints: exact resume) the weights keep the wrapper's names.
    """
    directory = Path(directory)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    merged = merged_lora_state_dict(model) if merge_adapters and state_dict is None else None
    if merged is not None:
        _save_weights(inner_model(model), directory, merged)
        model.save_pretrained(directory / "adapter")
    else:
        _save_weights(model, directory, state_dict)
    if processor is not None:
        processor.save_pretrained(directory)
    return directory


def merged_lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """For a PEFT model with LoRA adapters: the wrapped model's state dict under its own names, with each active
    adapter's delta added to its base weight (layer by layer, through PEFT's get_delta_weight; the policy itself is
    not modified). None for any other model.

    Raises:
        NotImplementedError for adapters this cannot merge exactly (see :func:`check_lora_exportable`).
    """
    base = inner_model(model)
    if base is model:
        return None
    state = {name.replace(".base_layer.", "."): tensor for name, tensor in base.state_dict().items()
             if ".lora_" not in name}
    with torch.no_grad():
        for name, module in _mergeable_lora_layers(base):
            key = f"{name}.weight"
            for adapter in module.active_adapters:
                state[key] = state[key] + module.get_delta_weight(adapter).to(state[key].dtype)
    return state


def check_lora_exportable(model: torch.nn.Module) -> None:
    """Raise NotImplementedError now, not after training, if `model` is a PEFT model whose adapters
    :func:`merged_lora_state_dict` cannot merge exactly (DoRA, LoRA bias, LoRA on embeddings or convolutions)."""
    base = inner_model(model)
    if base is not model:
        _mergeable_lora_layers(base)


def _mergeable_lora_layers(base: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every LoRA layer of `base`; NotImplementedError naming the first one that is not a plain
    LoRA linear layer."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear as LoraLinear

    layers = [(name, module) for name, module in base.named_modules() if isinstance(module, LoraLayer)]
    for name, module in layers:
        extras = [getattr(module, option, {}) for option in ("use_dora", "lora_bias")]
        if not isinstance(module, LoraLinear) or any(e.get(a, False) for e in extras for a in module.active_adapters):
            raise NotImplementedError(f"cannot export {name} ({type(module).__name__}) merged: only plain LoRA on "
                                      "linear layers (no DoRA, no LoRA bias) is merged; save the adapter with "
                                      "save_pretrained instead")
    return layers
