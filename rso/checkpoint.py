"""One checkpoint dict with everything needed to resume, written atomically, read with weights_only=True.

Version 2 stores a SHA-256 over the whole content (every tensor's bytes, every counter) and
:func:`load_checkpoint` verifies it, so a flipped bit anywhere is an error, never silently different weights.
Every way a checkpoint can fail to load (missing, truncated, random bytes, a flipped bit, a config with a
wrong type, non-finite weights) is one :class:`CheckpointError` line. Version 1 checkpoints (no checksum)
still load.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import struct
from pathlib import Path

import torch
from torch import nn

from rso.storage import atomic_write

FORMAT = "rso-checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)
GENERATOR_STATE_SIZE = torch.Generator().get_state().numel()
PROGRESS_FIELDS = {"cycle": int, "target_index": int, "visits": int, "accepted": int, "forward_samples": int,
                   "optimizer_steps": int, "seconds": (int, float), "history": list}
SWEEP_FIELDS = {"visit": int, "accepted": int, "loss_sum": (int, float), "seconds": (int, float)}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or not one of ours."""


def checkpoint_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / "checkpoint.pt" if path.is_dir() else path


def _digest(value, sha) -> None:
    """Feed ``value`` to ``sha`` in a form that survives torch.save/torch.load unchanged."""
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().reshape(-1)
        sha.update(f"T{data.dtype}{tuple(value.shape)}".encode())
        sha.update(data.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        sha.update(f"D{len(value)}".encode())
        for key in sorted(value, key=repr):
            _digest(key, sha)
            _digest(value[key], sha)
    elif isinstance(value, (list, tuple)):
        sha.update(f"L{len(value)}".encode())
        for item in value:
            _digest(item, sha)
    elif isinstance(value, float):
        sha.update(b"F" + struct.pack("<d", value))
    else:   # str, int, bool, None
        sha.update(f"{type(value).__name__}:{value!r}".encode())


def content_checksum(state: dict) -> str:
    sha = hashlib.sha256()
    _digest({key: value for key, value in state.items() if key != "checksum"}, sha)
    return sha.hexdigest()


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically: a crash, a full disk or Ctrl-C mid-write leaves the previous
    checkpoint intact and no ``.tmp`` (:class:`rso.storage.StorageError` names the folder and its free space)."""
    full = {"format": FORMAT, "version": VERSION, **state}
    full["checksum"] = content_checksum(full)
    buffer = io.BytesIO()
    torch.save(full, buffer)
    atomic_write(path, buffer.getbuffer())


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


def non_finite_tensors(tensors: dict) -> list[str]:
    """Names of the floating-point tensors in ``tensors`` holding NaN or infinity."""
    return [name for name, tensor in tensors.items()
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all()]


def check_finite_weights(tensors: dict, where: str) -> None:
    bad = non_finite_tensors(tensors)
    if bad:
        raise CheckpointError(f"{where}: non-finite values (NaN or infinity) in {', '.join(bad[:5])}"
                              + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))


def _check_structure(state: dict, path: Path) -> None:
    model = state["model"]
    if not all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in model.items()):
        raise CheckpointError(f"{path}: 'model' is not a dict of named tensors")
    check_finite_weights(model, f"{path}: weights")
    progress = state.get("progress")
    if progress is not None:
        _check_fields(progress, PROGRESS_FIELDS, f"{path}: progress")
    generator = state.get("generator")
    if generator is not None and not (isinstance(generator, torch.Tensor) and generator.dtype == torch.uint8
                                      and generator.numel() == GENERATOR_STATE_SIZE):
        raise CheckpointError(f"{path}: 'generator' is not a random generator state")
    sweep = state.get("sweep")
    if sweep is not None:
        _check_fields(sweep, SWEEP_FIELDS, f"{path}: sweep")
        if not 0 < sweep["visit"] or sweep["accepted"] > sweep["visit"]:
            raise CheckpointError(f"{path}: sweep position is inconsistent ({sweep})")
    from rso.config import ConfigFieldError, TrainConfig

    try:
        TrainConfig.from_checkpoint(state["config"])
    except ConfigFieldError as error:
        raise CheckpointError(f"{path}: config {error}") from None


def _check_fields(values, fields: dict, where: str) -> None:
    if not isinstance(values, dict):
        raise CheckpointError(f"{where} is not a dict")
    for name, kind in fields.items():
        value = values.get(name)
        if name not in values or isinstance(value, bool) or not isinstance(value, kind):
            raise CheckpointError(f"{where}: field {name!r} is missing or of the wrong type ({value!r})")
        if isinstance(value, (int, float)) and not (math.isfinite(value) and value >= 0):
            raise CheckpointError(f"{where}: field {name!r} must be a finite non-negative number, got {value!r}")


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read and verify a checkpoint (format, version, checksum, structure, config, finite weights)."""
    path = checkpoint_path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:      # any damage to the zip or the pickle: one line, whatever the exception
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt: {_first_line(error)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an rso checkpoint (no '{FORMAT}' format tag)")
    version = state.get("version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: checkpoint version {version!r}, this rso reads versions "
                              f"{', '.join(map(str, READABLE_VERSIONS))}")
    if version >= 2:
        try:
            expected = content_checksum(state)
        except Exception as error:
            raise CheckpointError(f"{path}: content cannot be checksummed ({_first_line(error)})") from None
        if state.get("checksum") != expected:
            raise CheckpointError(f"{path}: checksum mismatch: the file was damaged after it was written")
    for key in ("model", "config"):
        if not isinstance(state.get(key), dict):
            raise CheckpointError(f"{path}: checkpoint lacks '{key}' (or it is not a dict)")
    _check_structure(state, path)
    return state


def input_transform_of(state: dict) -> str:
    """The input transform (a key of ``rso.data.INPUT_TRANSFORMS``) the checkpoint's run trained with."""
    from rso.config import TrainConfig

    return TrainConfig.from_dict(state["config"]).resolved_input_transform()


def model_from_checkpoint(state: dict) -> nn.Module:
    """Rebuild the model a checkpoint was trained with and load its weights (and BN statistics).

    The config is checked (types, ranges, and the model's size against free memory) before anything is built.
    """
    from rso.config import ConfigFieldError, TrainConfig
    from rso.models import build_model
    from rso.resources import ResourceError, check_model_fits

    try:
        config = TrainConfig.from_checkpoint(state["config"])
        check_model_fits(config)
    except (ConfigFieldError, ResourceError) as error:
        raise CheckpointError(f"checkpoint config: {error}") from None
    model = build_model(config.model, **config.model_options())
    model = model.to(getattr(torch, config.dtype))
    try:
        model.load_state_dict(state["model"])
    except Exception as error:
        raise CheckpointError(f"checkpoint weights do not fit model {config.model!r}: {_first_line(error)}") from None
    check_finite_weights(model.state_dict(), "checkpoint weights")
    return model
