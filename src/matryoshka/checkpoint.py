"""Checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint is two files, ``<name>.safetensors`` and ``<name>.json``. The JSON holds the
metadata and the SHA-256 of the tensor file, and is written last: a checkpoint whose JSON exists
is complete. Loading verifies the checksum; :func:`latest_checkpoint` skips torn or corrupted
checkpoints and falls back to the previous good one.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from matryoshka.io import atomic_write_bytes

__all__ = [
    "CheckpointError",
    "capture_rng",
    "latest_checkpoint",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
]

FORMAT = "matryoshka-checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, torn, or does not match what was asked for."""


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Torch RNG state as tensors; Python and NumPy RNG state as JSON-ready data."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    py_state = random.getstate()
    np_state: tuple[Any, ...] = tuple(np.random.get_state())
    meta = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [
            np_state[0],
            np_state[1].tolist(),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _optimizer_to_flat(
    opt: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    meta: dict[str, Any] | None = None,
    rng: bool = True,
) -> Path:
    """Save ``path.safetensors`` + ``path.json`` atomically (tensor file first, JSON last).

    ``meta`` is any JSON-ready data (step, epoch, config, metrics). Returns the JSON path.
    """
    path = Path(path)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    info: dict[str, Any] = {"format": FORMAT, "meta": meta or {}}
    if optimizer is not None:
        opt_tensors, info["optimizer"] = _optimizer_to_flat(optimizer)
        tensors.update({k: v.detach().cpu().contiguous() for k, v in opt_tensors.items()})
    if scheduler is not None:
        info["scheduler"] = scheduler.state_dict()
    if rng:
        rng_tensors, info["rng"] = capture_rng()
        tensors.update(rng_tensors)
    blob = st_save(tensors)
    info["tensors_file"] = path.name + ".safetensors"
    info["sha256"] = hashlib.sha256(blob).hexdigest()
    atomic_write_bytes(path.with_name(info["tensors_file"]), blob)
    json_path = path.with_name(path.name + ".json")
    atomic_write_bytes(json_path, json.dumps(info, indent=1).encode())
    return json_path


def load_checkpoint(
    json_path: str | Path,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    rng: bool = False,
) -> dict[str, Any]:
    """Verify and load a checkpoint written by :func:`save_checkpoint`; returns its ``meta``.

    Raises :class:`CheckpointError` when a file is missing, unreadable or fails its checksum.
    """
    json_path = Path(json_path)
    try:
        info = json.loads(json_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint={str(json_path)!r} does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"checkpoint={str(json_path)!r} is not valid JSON ({e}): the file is torn or "
            "corrupted; resume from an earlier checkpoint."
        ) from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint={str(json_path)!r} is not a {FORMAT} file: pass a .json written by "
            "matryoshka's save_checkpoint."
        )
    tensor_path = json_path.with_name(info["tensors_file"])
    try:
        blob = tensor_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint tensors {str(tensor_path)!r} are missing.") from None
    digest = hashlib.sha256(blob).hexdigest()
    if digest != info["sha256"]:
        raise CheckpointError(
            f"checkpoint tensors {str(tensor_path)!r} fail their checksum (sha256 {digest[:12]}... "
            f"!= recorded {info['sha256'][:12]}...): the file is truncated or corrupted; "
            "resume from an earlier checkpoint."
        )
    tensors = st_load(blob)
    if model is not None:
        state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        model.load_state_dict(state)
    if optimizer is not None and "optimizer" in info:
        optimizer.load_state_dict(_optimizer_from_flat(tensors, info["optimizer"]))
    if scheduler is not None and "scheduler" in info:
        scheduler.load_state_dict(info["scheduler"])
    if rng and "rng" in info:
        restore_rng(tensors, info["rng"])
    return dict(info["meta"])


def latest_checkpoint(folder: str | Path, pattern: str = "step-*.json") -> Path | None:
    """The newest checkpoint in ``folder`` that passes its checksum, or ``None``.

    Torn or corrupted checkpoints are skipped, so a crash while writing never loses the previous
    good one.
    """
    for json_path in sorted(Path(folder).glob(pattern), reverse=True):
        try:
            load_checkpoint(json_path)
        except CheckpointError:
            continue
        return json_path
    return None
