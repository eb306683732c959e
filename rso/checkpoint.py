"""One checkpoint dict with everything needed to resume, written atomically, read with weights_only=True."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

FORMAT = "rso-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or not one of ours."""


def checkpoint_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / "checkpoint.pt" if path.is_dir() else path


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically: a crash mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, "version": VERSION, **state}, temporary)
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = checkpoint_path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt: {first_line})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an rso checkpoint (no '{FORMAT}' format tag)")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')}, this rso reads version {VERSION}")
    for key in ("model", "config"):
        if not isinstance(state.get(key), dict):
            raise CheckpointError(f"{path}: checkpoint lacks '{key}' (or it is not a dict)")
    return state


def input_transform_of(state: dict) -> str:
    """The input transform (a key of ``rso.data.INPUT_TRANSFORMS``) the checkpoint's run trained with."""
    from rso.config import TrainConfig

    return TrainConfig.from_dict(state["config"]).resolved_input_transform()


def model_from_checkpoint(state: dict) -> nn.Module:
    """Rebuild the model a checkpoint was trained with and load its weights (and BN statistics)."""
    from rso.config import TrainConfig
    from rso.models import build_model

    config = TrainConfig.from_dict(state["config"])
    model = build_model(config.model, **config.model_options())
    model = model.to(getattr(torch, config.dtype))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint weights do not fit model {config.model!r}: {str(error).splitlines()[0]}") from None
    return model
