"""One typed config for a training run; argparse flags override its defaults; the resolved config is saved."""

from __future__ import annotations

import argparse
import math
import types
import typing
from dataclasses import asdict, dataclass, fields

from rso.data.mnist import INPUT_TRANSFORMS
from rso.engines.base import SEARCH_BN_MODES
from rso.models import INPUT_TRANSFORMS as MODEL_INPUT_TRANSFORMS
from rso.models import MODELS
from rso.search.candidates import SAMPLERS
from rso.search.loop import CHUNKINGS
from rso.search.visit import ORDERS

OPTIMIZERS = {"rso": "random search optimization (gradient-free)",
              "sgd": "backprop, SGD with momentum", "adam": "backprop, Adam"}
# Named sets of flags (explicit flags override them). "authors": the configuration of the authors' public code
# (rohun-tripathi/RSO-gradient-free, train.py) for MNIST; `make mnist-rso-paper` runs it.
PRESETS = {
    "authors": dict(model="paper6", input_transform="center", batch_size=5000, cycles=50, weight_decay=1e-4,
                    search_bn="fixed-below", search_bn_images=2000, final_sigma_fraction=0.1, bn_sigma=0.167,
                    order="output-first", chunking="per-visit", sampler="gaussian", anneal=True),
}
# torch/numba threads per process when --threads is not given. On a shared machine a thread that waits for a
# busy core stalls every small multi-threaded operation (benchmarks/threads_ab.py measured all cores several
# times slower than one thread under load); one thread per process loses only the CPU share.
DEFAULT_THREADS = 1
# Flags a resumed run may change; everything else comes from its checkpoint.
RESUMABLE_OVERRIDES = {"cycles", "epochs", "device", "progress", "run_dir", "data_dir", "download", "eval_every",
                       "max_seconds", "threads", "resume", "resume_if_exists", "name", "engine", "workers",
                       "checkpoint_every"}
# Fields a checkpoint's config must hold (they decide the run's trajectory): a config without them, or with
# a wrong type, is rejected, never filled with defaults. Fields added later may be absent from older ones.
REQUIRED_IN_CHECKPOINT = ("model", "widths", "depth", "channels", "optimizer", "train_subset", "test_subset",
                          "batch_size", "cycles", "anneal", "final_sigma_fraction", "bn_sigma", "weight_decay",
                          "sampler", "order", "chunking", "epochs", "lr", "momentum", "dtype", "seed")
MAX_SEED = 2 ** 64 - 1      # torch.Generator.manual_seed takes 0..2**64-1
MAX_THREADS = 1024


class ConfigFieldError(ValueError):
    """A config read back from a checkpoint lacks a field or holds a value of the wrong type."""


def _fits(value, hint) -> bool:
    """Whether ``value`` (as read from JSON or a checkpoint) has the annotated type ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_fits(item, args[0]) for item in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


@dataclass
class TrainConfig:
    # what is trained
    model: str = "oneconv"
    widths: tuple[int, ...] = (128,)       # mlp hidden widths
    depth: int = 6                         # convnet conv layers
    channels: int = 16                     # convnet channels
    optimizer: str = "rso"
    # data
    data_dir: str | None = None
    download: bool = True                  # fetch MNIST when missing and the network allows
    input_transform: str = "auto"          # rso.data.INPUT_TRANSFORMS key; auto: the model's (resolved when a run starts)
    train_subset: int | None = None
    test_subset: int | None = None
    batch_size: int = 1000
    # RSO
    cycles: int = 10
    anneal: bool = True
    final_sigma_fraction: float = 0.1
    bn_sigma: float = 0.167
    weight_decay: float = 0.0
    sampler: str = "gaussian"
    order: str = "output-first"
    chunking: str = "per-visit"
    search_bn: str = "chunk"               # rso.engines.SEARCH_BN_MODES: BN statistics below the searched layer
    search_bn_images: int = 2000           # fixed-below: the first N training images give the fixed statistics
    engine: str = "auto"
    suffix_precision: str | None = None    # fast engine: "bfloat16" recomputes the suffix in bf16 (inexact)
    # backprop
    epochs: int = 5
    lr: float = 0.05
    momentum: float = 0.9
    # numerics and machine
    dtype: str = "float32"
    device: str = "auto"
    threads: int | None = None
    workers: int = 1                       # RSO: processes sharing every chunk (rso.distributed)
    seed: int = 0
    # evaluation and stopping
    eval_every: str = "sweep"              # "sweep" or "cycle" (RSO); backprop evaluates every epoch
    bn_samples: int = 10000                # training examples for BN recalibration before each evaluation
    target_accuracy: float | None = None   # stop once test accuracy exceeds this
    max_seconds: float | None = None       # wall-time cap (counts time across resumes)
    checkpoint_every: float = 60.0         # RSO: seconds between checkpoints inside a layer sweep
    # the run
    run_dir: str = "runs"
    name: str | None = None
    resume: str | None = None
    resume_if_exists: bool = False
    progress: bool = True
    preset: str | None = None              # the PRESETS entry the run started from (its values are in the fields)

    def validate(self, n_train: int | None = None) -> None:
        """Raise ValueError naming the bad field; ``n_train`` checks the batch size against the data."""
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{field.name.replace('_', ' ')} must be a finite number, got {value}")
        checks = [
            (self.model in MODELS, f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"),
            (self.batch_size >= 1, f"batch size must be positive, got {self.batch_size}"),
            (self.cycles >= 1, f"cycles must be positive, got {self.cycles}"),
            (self.epochs >= 1, f"epochs must be positive, got {self.epochs}"),
            (self.lr > 0, f"learning rate must be positive, got {self.lr}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (0 <= self.weight_decay < 1, f"weight decay must be in [0, 1), got {self.weight_decay}"),
            (0 < self.final_sigma_fraction <= 1, f"final sigma fraction must be in (0, 1], got {self.final_sigma_fraction}"),
            (self.bn_sigma > 0, f"bn sigma must be positive, got {self.bn_sigma}"),
            (self.sampler in SAMPLERS, f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}"),
            (self.order in ORDERS, f"unknown order {self.order!r}; choose one of {', '.join(ORDERS)}"),
            (self.chunking in CHUNKINGS, f"unknown chunking {self.chunking!r}; choose one of {', '.join(CHUNKINGS)}"),
            (self.input_transform == "auto" or self.input_transform in INPUT_TRANSFORMS,
             f"unknown input transform {self.input_transform!r}; choose auto or one of {', '.join(INPUT_TRANSFORMS)}"),
            (self.search_bn in SEARCH_BN_MODES, f"unknown search BN mode {self.search_bn!r}; choose one of {', '.join(SEARCH_BN_MODES)}"),
            (self.search_bn_images >= 1, f"search BN images must be positive, got {self.search_bn_images}"),
            (self.preset is None or self.preset in PRESETS, f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}"),
            (self.dtype in ("float32", "float64"), f"dtype must be float32 or float64, got {self.dtype!r}"),
            (_device_ok(self.device), f"unknown device {self.device!r}; use auto, cpu, cuda or cuda:N"),
            (self.eval_every in ("sweep", "cycle"), f"eval-every must be sweep or cycle, got {self.eval_every!r}"),
            (self.bn_samples >= 1, f"bn samples must be positive, got {self.bn_samples}"),
            (self.threads is None or 1 <= self.threads <= MAX_THREADS, f"threads must be in 1..{MAX_THREADS}, got {self.threads}"),
            (self.workers >= 1, f"workers must be positive, got {self.workers}"),
            (self.workers == 1 or self.optimizer == "rso",
             f"--workers {self.workers}: the backprop baselines run in one process (drop --workers)"),
            (self.batch_size >= self.workers, f"batch size {self.batch_size} is smaller than --workers {self.workers}"),
            (0 <= self.seed <= MAX_SEED, f"seed must be in 0..2**64-1, got {self.seed}"),
            (self.checkpoint_every >= 0, f"checkpoint every must be >= 0 seconds, got {self.checkpoint_every}"),
            (self.train_subset is None or 1 <= self.train_subset <= 60000, f"train subset must be in 1..60000, got {self.train_subset}"),
            (self.test_subset is None or 1 <= self.test_subset <= 10000, f"test subset must be in 1..10000, got {self.test_subset}"),
            (self.max_seconds is None or self.max_seconds > 0, f"max seconds must be positive, got {self.max_seconds}"),
            (self.target_accuracy is None or 0 < self.target_accuracy <= 1, f"target accuracy must be in (0, 1], got {self.target_accuracy}"),
            (all(width >= 1 for width in self.widths), f"widths must be positive, got {list(self.widths)}"),
            (1 <= self.depth <= 6, f"depth must be in 1..6, got {self.depth}"),
            (self.channels >= 1, f"channels must be positive, got {self.channels}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if n_train is not None and self.batch_size > n_train:
            raise ValueError(f"batch size {self.batch_size} is larger than the training set ({n_train} examples)")

    def resolved_input_transform(self) -> str:
        """The input transform the run uses: the given one, or the model's own for ``auto``."""
        return MODEL_INPUT_TRANSFORMS.get(self.model, "standardize") if self.input_transform == "auto" else self.input_transform

    def model_options(self) -> dict:
        return {"widths": tuple(self.widths), "depth": self.depth, "channels": self.channels}

    def to_dict(self) -> dict:
        data = asdict(self)
        data["widths"] = list(self.widths)
        return data

    @classmethod
    def from_checkpoint(cls, data) -> "TrainConfig":
        """The config saved in a checkpoint, checked: every field of :data:`REQUIRED_IN_CHECKPOINT` present,
        every field of its annotated type, every value in range. Raises :class:`ConfigFieldError`."""
        if not isinstance(data, dict):
            raise ConfigFieldError(f"is not a dict ({type(data).__name__})")
        missing = [name for name in REQUIRED_IN_CHECKPOINT if name not in data]
        if missing:
            raise ConfigFieldError(f"lacks field {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        hints = typing.get_type_hints(cls)
        for field in fields(cls):
            if field.name in data and not _fits(data[field.name], hints[field.name]):
                raise ConfigFieldError(f"field {field.name!r} has the wrong type: {data[field.name]!r} is not {hints[field.name]}")
        config = cls.from_dict(data)
        try:
            config.validate()
        except ValueError as error:
            raise ConfigFieldError(str(error)) from None
        return config

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        if "widths" in values:
            values["widths"] = tuple(values["widths"])
        return cls(**values)


def _device_ok(name) -> bool:
    if not isinstance(name, str):
        return False
    if name == "auto":
        return True
    import torch

    try:
        return torch.device(name).type in ("cpu", "cuda")
    except (RuntimeError, ValueError):
        return False


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _widths(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"widths must be positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """Flags default to SUPPRESS, so the namespace holds exactly what the user gave."""
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m rso.train", argument_default=argparse.SUPPRESS,
        description="Train a network on MNIST by RSO (gradient-free) or by backprop (SGD/Adam baseline).")
    group = parser.add_argument_group("model and optimizer")
    group.add_argument("--preset", choices=list(PRESETS),
                       help="start from a named configuration; explicit flags override it. authors: "
                            + ", ".join(f"{key}={value}" for key, value in PRESETS["authors"].items()))
    group.add_argument("--model", choices=list(MODELS), help=f"model from the registry (default {defaults.model})")
    group.add_argument("--widths", type=_widths, help="mlp hidden widths, e.g. 256,128 (default 128)")
    group.add_argument("--depth", type=int, help="convnet: number of conv layers 1..6 (default 6)")
    group.add_argument("--channels", type=_positive_int, help="convnet: channels (default 16)")
    group.add_argument("--optimizer", choices=list(OPTIMIZERS), help="rso, or the sgd/adam backprop baselines (default rso)")
    group = parser.add_argument_group("data")
    group.add_argument("--data-dir", dest="data_dir", help="folder holding MNIST/raw (default $RSO_DATA_DIR, else ./data)")
    group.add_argument("--no-download", dest="download", action="store_false", help="never download MNIST; fail if it is missing")
    group.add_argument("--train-subset", dest="train_subset", type=_positive_int, help="use the first N training examples")
    group.add_argument("--test-subset", dest="test_subset", type=_positive_int, help="use the first N test examples")
    group.add_argument("--batch-size", dest="batch_size", type=int, help=f"mini-batch (RSO chunk) size (default {defaults.batch_size})")
    group.add_argument("--input-transform", dest="input_transform", choices=["auto", *INPUT_TRANSFORMS],
                       help="standardize (mean/std, Algorithm 1) or center (/255 minus the training mean, the "
                            "authors' code); default auto: the model's (center for paper6)")
    group = parser.add_argument_group("RSO")
    group.add_argument("--cycles", type=int, help=f"RSO cycles over all weights (default {defaults.cycles})")
    group.add_argument("--no-anneal", dest="anneal", action="store_false", help="keep sigma constant")
    group.add_argument("--final-sigma-fraction", dest="final_sigma_fraction", type=float, help="anneal sigma linearly to this fraction (default 0.1)")
    group.add_argument("--bn-sigma", dest="bn_sigma", type=float, help="fixed sigma for BN gamma/beta (default 0.167)")
    group.add_argument("--weight-decay", dest="weight_decay", type=float, help="RSO: decay the current weight on each visit (default 0; authors' code 1e-4)")
    group.add_argument("--sampler", choices=list(SAMPLERS), help="distribution of dw (default gaussian)")
    group.add_argument("--order", choices=list(ORDERS), help="layer visiting order (default output-first)")
    group.add_argument("--chunking", choices=list(CHUNKINGS), help="a fresh chunk per weight visit (default) or one chunk per sweep")
    group.add_argument("--search-bn", dest="search_bn", choices=list(SEARCH_BN_MODES),
                       help="BN statistics during the search: chunk (default: every BN uses the scored chunk's) or "
                            "fixed-below (BN below the searched layer uses statistics fixed before each sweep from "
                            "the first --search-bn-images training images, as the authors' code does)")
    group.add_argument("--search-bn-images", dest="search_bn_images", type=_positive_int,
                       help="fixed-below: training images the fixed statistics come from (default 2000)")
    group.add_argument("--engine", help="candidate scoring engine: auto, reference, fast, prefix-cache (default auto)")
    group.add_argument("--suffix-precision", dest="suffix_precision", choices=["bfloat16"],
                       help="fast engine only: recompute the layers after the next one in bf16; faster where "
                            "the hardware has bf16, but it may change decisions (off by default: exact)")
    group = parser.add_argument_group("backprop baseline")
    group.add_argument("--epochs", type=int, help=f"backprop epochs (default {defaults.epochs})")
    group.add_argument("--lr", type=float, help=f"learning rate (default {defaults.lr})")
    group.add_argument("--momentum", type=float, help=f"SGD momentum (default {defaults.momentum})")
    group = parser.add_argument_group("numerics and machine")
    group.add_argument("--dtype", choices=["float32", "float64"], help="model and data precision (default float32)")
    group.add_argument("--device", help="auto, cpu or cuda (default auto: cuda when available)")
    group.add_argument("--threads", type=_positive_int, help=f"torch/numba threads per process (default "
                       f"{DEFAULT_THREADS}: holds up on a shared machine, where all cores ran several times slower; "
                       "one per worker with --workers or torchrun)")
    group.add_argument("--workers", type=_positive_int,
                       help="RSO: score every chunk in N local processes on torch.distributed (gloo on CPU, NCCL "
                            "on CUDA), each holding 1/N of the chunk; the same decisions as one process. "
                            "torchrun --nproc-per-node N -m rso.train starts them itself. The backprop baselines "
                            "run in one process (default 1)")
    group.add_argument("--seed", type=int, help="seed for init, shuffles and steps (default 0)")
    group = parser.add_argument_group("evaluation and stopping")
    group.add_argument("--eval-every", dest="eval_every", choices=["sweep", "cycle"], help="RSO: evaluate after every layer sweep (default) or cycle")
    group.add_argument("--bn-samples", dest="bn_samples", type=_positive_int, help="training examples used to recompute BN statistics before each evaluation (the final one uses all)")
    group.add_argument("--target-accuracy", dest="target_accuracy", type=float, help="stop once test accuracy exceeds this (0..1)")
    group.add_argument("--max-seconds", dest="max_seconds", type=float, help="stop once the run's wall time (training and evaluation, summed over resumes) passes this")
    group.add_argument("--checkpoint-every", dest="checkpoint_every", type=float, metavar="SECONDS",
                       help="RSO: also checkpoint inside a layer sweep every SECONDS (default 60; 0: after every visit); "
                            "SIGINT/SIGTERM checkpoint at the next visit")
    group = parser.add_argument_group("the run")
    group.add_argument("--run-dir", dest="run_dir", help="parent folder of runs (default runs)")
    group.add_argument("--name", help="run name (default: model-optimizer-time); an existing name gets a suffix")
    group.add_argument("--resume", help="continue the run in this folder (or from this checkpoint.pt)")
    group.add_argument("--resume-if-exists", dest="resume_if_exists", action="store_true", help="resume run-dir/name if it has a checkpoint, else start it")
    group.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, dict, argparse.ArgumentParser]:
    """Parse flags into a config; also return the flags the user actually gave (for resuming)."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    if "preset" in given:
        given = {**PRESETS[given["preset"]], **given}
    config = TrainConfig(**given)
    try:
        config.validate()
    except ValueError as error:
        parser.error(str(error))
    return config, given, parser
