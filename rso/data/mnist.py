"""MNIST from its four IDX files, read and validated without torchvision.

Files live in ``<data_dir>/MNIST/raw/`` (torchvision's layout), gzip-compressed or plain. Every check that
fails raises :class:`DataError` with a one-line message naming the file and the problem.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# name -> (magic number, number of records, image rows, image cols); labels have no rows/cols.
FILES = {
    "train-images-idx3-ubyte": (2051, 60000, 28, 28),
    "train-labels-idx1-ubyte": (2049, 60000, None, None),
    "t10k-images-idx3-ubyte": (2051, 10000, 28, 28),
    "t10k-labels-idx1-ubyte": (2049, 10000, None, None),
}
# The standard normalization constants of MNIST (mean and std of the training pixels scaled to [0, 1]).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
# name -> what it does to the uint8 pixels; the model registry says which one each model takes by default
INPUT_TRANSFORMS = {
    "standardize": "pixels / 255, minus the MNIST mean 0.1307, divided by the MNIST std 0.3081 (Algorithm 1)",
    "center": "pixels / 255 minus the mean of all training pixels, no division by the std (the authors' code)",
}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)


class DataError(RuntimeError):
    """A data file is missing, unreadable or not what MNIST should be."""


@dataclass
class MNIST:
    """The data set as tensors in memory: normalized float images (N, 1, 28, 28), int64 labels, and the name
    of the input transform that produced the images (a key of :data:`INPUT_TRANSFORMS`)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    transform: str = "standardize"

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "MNIST":
        return MNIST(
            self.train_images.to(device=device, dtype=dtype or self.train_images.dtype),
            self.train_labels.to(device),
            self.test_images.to(device=device, dtype=dtype or self.test_images.dtype),
            self.test_labels.to(device),
            self.transform,
        )


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``--data-dir`` if given, else ``$RSO_DATA_DIR``, else ``./data``."""
    if data_dir is None:
        data_dir = os.environ.get("RSO_DATA_DIR") or "data"
    return Path(data_dir)


def raw_folder(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / "MNIST" / "raw"


def _find(raw: Path, stem: str) -> Path | None:
    for candidate in (raw / f"{stem}.gz", raw / stem):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: str | os.PathLike, magic: int, count: int | None = None,
             rows: int | None = None, cols: int | None = None) -> np.ndarray:
    """Read one IDX file (gzip or plain) and check its magic number, count and shape.

    At most the expected size plus one byte is read (decompressed): a file that would inflate to more, a
    gzip bomb among them, is refused after that much, not after filling the memory.
    """
    path = Path(path)
    header_size = 8 if rows is None else 16
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            header = handle.read(header_size)
            shape = _idx_shape(path, header, header_size, magic, count, rows, cols)
            expected = int(np.prod(shape))
            data = handle.read(expected + 1)    # one byte more tells a file with trailing bytes
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise DataError(f"{path}: corrupt or truncated gzip file ({error})") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error})") from None
    if len(data) < expected:
        raise DataError(f"{path}: truncated: {len(data)} data bytes, expected {expected}")
    if len(data) > expected:
        raise DataError(f"{path}: has trailing bytes: more than the {expected} data bytes expected")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _idx_shape(path: Path, header: bytes, header_size: int, magic: int, count: int | None, rows: int | None,
               cols: int | None) -> tuple[int, ...]:
    """The array shape an IDX header announces, checked against the expected magic, count and image size."""
    if len(header) < header_size:
        raise DataError(f"{path}: truncated header ({len(header)} bytes, expected at least {header_size})")
    found_magic, found_count = struct.unpack(">II", header[:8])
    if found_magic != magic:
        raise DataError(f"{path}: bad magic number {found_magic}, expected {magic}")
    if count is not None and found_count != count:
        raise DataError(f"{path}: holds {found_count} records, expected {count}")
    if rows is None:
        return (found_count,)
    found_rows, found_cols = struct.unpack(">II", header[8:16])
    if (found_rows, found_cols) != (rows, cols):
        raise DataError(f"{path}: images are {found_rows}x{found_cols}, expected {rows}x{cols}")
    return (found_count, rows, cols)


def download_mnist(data_dir: str | os.PathLike) -> None:
    """Fetch the four files into ``<data_dir>/MNIST/raw``: torchvision if installed, else the standard library."""
    raw = raw_folder(data_dir)
    try:
        import torchvision  # noqa: F401  (optional extra; imported lazily)
    except Exception:  # not installed, or a CUDA build that fails beside CPU torch
        torchvision = None
    if torchvision is not None:
        try:
            from torchvision.datasets import MNIST as TorchvisionMNIST

            TorchvisionMNIST(root=str(data_dir), train=True, download=True)
            TorchvisionMNIST(root=str(data_dir), train=False, download=True)
            return
        except Exception:
            pass  # fall back to the standard library below
    raw.mkdir(parents=True, exist_ok=True)
    for stem in FILES:
        if _find(raw, stem) is not None:
            continue
        last_error: Exception | None = None
        for mirror in MIRRORS:
            target = raw / f"{stem}.gz"
            partial = target.with_suffix(".gz.part")
            try:
                with urllib.request.urlopen(mirror + f"{stem}.gz", timeout=30) as response, open(partial, "wb") as out:
                    shutil.copyfileobj(response, out)
                os.replace(partial, target)
                last_error = None
                break
            except Exception as error:  # network refused, DNS failure, HTTP error
                last_error = error
                partial.unlink(missing_ok=True)
        if last_error is not None:
            raise DataError(f"could not download {stem}.gz ({last_error})")


def _missing_message(raw: Path, missing: list[str], reason: str) -> str:
    names = ", ".join(f"{stem}[.gz]" for stem in FILES)
    return (f"MNIST not found in {raw} (missing: {', '.join(missing)}); {reason}. "
            f"Expected the four IDX files {names}; set --data-dir or RSO_DATA_DIR to the folder holding MNIST/raw/")


def normalize(images: np.ndarray | torch.Tensor, transform: str = "standardize",
              train_mean: float | None = None) -> torch.Tensor:
    """uint8 pixels -> float32 scaled to [0, 1], then ``transform`` (see :data:`INPUT_TRANSFORMS`);
    ``center`` subtracts ``train_mean``, the mean of the training pixels scaled to [0, 1]."""
    if transform not in INPUT_TRANSFORMS:
        raise ValueError(f"unknown input transform {transform!r}; choose one of {', '.join(INPUT_TRANSFORMS)}")
    if not isinstance(images, torch.Tensor):
        images = torch.from_numpy(np.array(images, dtype=np.uint8))  # a copy: the IDX buffer is read-only
    scaled = images.to(torch.float32) / 255.0
    if transform == "center":
        if train_mean is None:
            raise ValueError("the center transform needs the training mean")
        return scaled - train_mean
    return (scaled - MNIST_MEAN) / MNIST_STD


def load_mnist(data_dir: str | os.PathLike | None = None, train_subset: int | None = None,
               test_subset: int | None = None, download: bool = True, transform: str = "standardize") -> MNIST:
    """Load MNIST as normalized tensors; download when missing and ``download`` is set and the network allows.

    ``transform``: a key of :data:`INPUT_TRANSFORMS`. ``center`` subtracts the mean over all 60,000 training
    images, whatever ``train_subset`` is (as the authors' code does, computed here in float64).
    """
    if transform not in INPUT_TRANSFORMS:
        raise ValueError(f"unknown input transform {transform!r}; choose one of {', '.join(INPUT_TRANSFORMS)}")
    data_dir = resolve_data_dir(data_dir)
    raw = raw_folder(data_dir)
    missing = [stem for stem in FILES if _find(raw, stem) is None]
    if missing:
        if not download:
            raise DataError(_missing_message(raw, missing, "downloading is off"))
        try:
            download_mnist(data_dir)
        except DataError as error:
            raise DataError(_missing_message(raw, missing, f"download failed: {error}")) from None
        missing = [stem for stem in FILES if _find(raw, stem) is None]
        if missing:
            raise DataError(_missing_message(raw, missing, "download did not produce them"))
    arrays = {stem: read_idx(_find(raw, stem), *spec) for stem, spec in FILES.items()}
    for stem in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        labels = arrays[stem]
        if labels.size and labels.max() > 9:
            raise DataError(f"{_find(raw, stem)}: label {int(labels.max())} out of range 0..9")
    train_n = _check_subset("train_subset", train_subset, 60000)
    test_n = _check_subset("test_subset", test_subset, 10000)
    train_mean = float(arrays["train-images-idx3-ubyte"].mean(dtype=np.float64) / 255.0) if transform == "center" else None
    return MNIST(
        train_images=normalize(arrays["train-images-idx3-ubyte"][:train_n], transform, train_mean).unsqueeze(1),
        train_labels=torch.from_numpy(arrays["train-labels-idx1-ubyte"][:train_n].astype(np.int64)),
        test_images=normalize(arrays["t10k-images-idx3-ubyte"][:test_n], transform, train_mean).unsqueeze(1),
        test_labels=torch.from_numpy(arrays["t10k-labels-idx1-ubyte"][:test_n].astype(np.int64)),
        transform=transform,
    )


def _check_subset(name: str, value: int | None, total: int) -> int:
    if value is None:
        return total
    if not 0 < value <= total:
        raise ValueError(f"{name} must be in 1..{total}, got {value}")
    return value
