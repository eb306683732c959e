"""Is there memory for a model before it is built? Sizes from a build on torch's meta device (no storage).

``--channels 1000000`` or ``--widths 1000000000000`` (or a checkpoint whose config says so) would otherwise
end in an allocation traceback with C++ frames, or take the machine's memory first. The estimate is a lower
bound (the weights once, plus the largest activation of one batch twice), so a run it refuses could not run.
"""

from __future__ import annotations

import os

import torch

IMAGE_SHAPE = (1, 28, 28)


class ResourceError(ValueError):
    """A model or batch needs more memory than the machine has."""


def available_memory() -> int | None:
    """Bytes of memory available now (MemAvailable on Linux), or None when unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def builder_options(model_name: str, options: dict) -> dict:
    """The options the model's builder takes (as :func:`rso.models.build_model` passes them)."""
    from rso.models import MODELS

    builder = MODELS[model_name][0]
    accepted = builder.__code__.co_varnames[: builder.__code__.co_argcount]
    return {key: value for key, value in options.items() if key in accepted and value is not None}


def model_footprint(model_name: str, batch_size: int, **options) -> tuple[int, int]:
    """(parameters, elements of the largest activation of a ``batch_size`` batch), built on the meta device."""
    from rso.models import MODELS

    with torch.device("meta"):
        model = MODELS[model_name][0](**builder_options(model_name, options))
        x = torch.empty(batch_size, *IMAGE_SHAPE)
        largest = x.numel()
        with torch.no_grad():
            for layer in model.children() if isinstance(model, torch.nn.Sequential) else [model]:
                x = layer(x)
                largest = max(largest, x.numel())
    return sum(parameter.numel() for parameter in model.parameters()), largest


def check_model_fits(config, available: int | None = None) -> None:
    """Raise :class:`ResourceError` (one line) when ``config``'s model cannot fit in memory."""
    element = 8 if config.dtype == "float64" else 4
    batch = max(config.batch_size, 1)
    options = builder_options(config.model, config.model_options())
    try:
        parameters, largest = model_footprint(config.model, batch, **options)
    except (RuntimeError, ValueError, OverflowError) as error:
        raise ResourceError(f"model {config.model!r} cannot be built with {options}: "
                            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    needed = (parameters + 2 * largest) * element
    available = available_memory() if available is None else available
    if available is not None and needed > available:
        from rso.storage import human_bytes

        raise ResourceError(f"model {config.model!r} with {options} has {parameters:,} weights and "
                            f"activations of {largest:,} values per batch of {batch}: it needs at least "
                            f"{human_bytes(needed)}, {human_bytes(available)} of memory is available")
