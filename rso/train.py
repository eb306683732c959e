"""``python -m rso.train``: train a model on MNIST by RSO or by backprop, with a self-describing run folder.

Public API: :func:`train` takes a :class:`~rso.config.TrainConfig` and returns the final metrics.
Every layer sweep (RSO) or epoch (backprop) ends with an evaluation, a summary line, TensorBoard scalars and
an atomic checkpoint; inside a sweep a checkpoint is also written every ``--checkpoint-every`` seconds and on
SIGINT/SIGTERM. ``--resume`` continues from the last one (at the saved visit) and ends with exactly the
weights an uninterrupted run with the same seed would have (on CPU). One run at a time holds a run folder.
"""

from __future__ import annotations

import os
import sys
import time

if __name__ == "__main__":  # Ctrl-C or SIGTERM while torch and friends import: one line, no traceback
    import signal

    def _quit_during_start_up(signum, frame):
        sys.stderr.write(f"interrupted ({signal.Signals(signum).name}) during start-up; nothing was written\n")
        os._exit(128 + signum)

    for _signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signum, _quit_during_start_up)
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from rso import dashboard as tags
from rso import distributed
from rso.baselines import make_optimizer, train_epoch
from rso.checkpoint import CheckpointError, check_finite_weights, checkpoint_path, load_checkpoint, save_checkpoint
from rso.config import DEFAULT_THREADS, RESUMABLE_OVERRIDES, TrainConfig, parse_args
from rso.data import MNIST, DataError, load_mnist
from rso.engines import ENGINES, make_engine
from rso.evaluate import evaluate, recalibrate_batchnorm
from rso.interrupts import INTERRUPTS, StopRequested
from rso.models import build_model, count_weights
from rso.progress import SCORINGS, SweepProgress, evaluation_work, fill_scale, format_seconds, sweep_costs
from rso.provenance import UNRECORDED
from rso.resources import ResourceError, check_model_fits
from rso.runs import RunLogger, unique_run_dir
from rso.search.candidates import get_sampler
from rso.search.loop import N_CANDIDATES, NonFiniteLossError, SweepStats, run_sweep
from rso.search.schedule import annealed_sigma
from rso.search.visit import BATCHNORMS, visit_order
from rso.stopping import StoppingCriteria
from rso.storage import RunFolderLock, StorageError


LOSS_EVERY = 256          # RSO: a train-loss point every this many weight visits (and at the end of each sweep)
LOSS_EVERY_STEPS = 25     # backprop: a train-loss point every this many steps (fewer on a short epoch)
TESTS_PER_EPOCH = 4       # backprop: test accuracy and loss this many times an epoch (TensorBoard only)


class RunError(RuntimeError):
    """A run cannot start or go on; the message says why (and where the last checkpoint is)."""


class ConfigError(ValueError):
    """A flag that does not fit the data (e.g. a batch larger than the training set): a usage error."""


class RunInterrupted(RunError):
    """Ctrl-C or SIGTERM: the last checkpoint stands, and ``--resume`` continues from it."""

    def __init__(self, message: str, status: int = 130):
        super().__init__(message)
        self.status = status


class _NoLogger:
    """What ranks other than 0 log: nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


@dataclass
class Progress:
    """Where a run stands: what resumes it, and the counters a fair comparison needs."""

    cycle: int = 0                # RSO: next cycle; backprop: next epoch
    target_index: int = 0         # RSO: next sweep within the cycle
    visits: int = 0               # scalar weight visits (RSO) or scalar weight updates (backprop)
    accepted: int = 0             # RSO: visits that changed the weight to a new candidate
    forward_samples: int = 0      # examples through a forward pass (backprop: forward + backward count 2)
    optimizer_steps: int = 0      # backprop steps
    seconds: float = 0.0          # training time, summed over resumes
    sweep_seconds: dict = field(default_factory=dict)  # RSO: each tensor's last sweep, in seconds (for the ETA)
    history: list = field(default_factory=list)  # per evaluation: dict of counters and metrics

    def state(self) -> dict:
        return dict(self.__dict__)


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RunError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda was asked for, but CUDA is not available here (use --device cpu or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RunError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def locked_folder(config: TrainConfig) -> tuple[Path | None, RunFolderLock | None]:
    """The folder a resume (or ``--resume-if-exists``) writes, locked before its checkpoint is read."""
    if config.resume_if_exists and not config.name:
        raise ConfigError("--resume-if-exists needs --name (the run to continue)")
    if config.resume is not None:
        folder = checkpoint_path(config.resume).parent
        return (folder, RunFolderLock(folder)) if folder.is_dir() else (None, None)
    if config.resume_if_exists:
        folder = Path(config.run_dir) / config.name
        folder.mkdir(parents=True, exist_ok=True)
        return folder, RunFolderLock(folder)
    return None, None


def resolve_resume(config: TrainConfig, given: dict) -> tuple[TrainConfig, dict | None, Path | None]:
    """The config to run and the checkpoint to continue from, if any."""
    source = config.resume
    if config.resume_if_exists and not config.name:
        raise ConfigError("--resume-if-exists needs --name (the run to continue)")
    if source is None and config.resume_if_exists and config.name:
        existing = Path(config.run_dir) / config.name / "checkpoint.pt"
        source = str(existing) if existing.is_file() else None
    if source is None:
        return config, None, None
    state = load_checkpoint(source)
    saved = TrainConfig.from_checkpoint(state["config"])
    conflicts = [key for key, value in given.items()
                 if key not in RESUMABLE_OVERRIDES and getattr(saved, key) != value]
    if conflicts:
        flags = ", ".join("--" + key.replace("_", "-") for key in conflicts)
        raise RunError(f"cannot change {flags} when resuming {checkpoint_path(source)}; "
                       "flags a resume may change: " + ", ".join(sorted("--" + key.replace("_", "-") for key in RESUMABLE_OVERRIDES)))
    overrides = {key: value for key, value in given.items() if key in RESUMABLE_OVERRIDES - {"resume", "name", "run_dir"}}
    resumed = TrainConfig.from_dict({**saved.to_dict(), **overrides})
    return resumed, state, checkpoint_path(source).parent


class Trainer:
    """Holds a run's model, data, logger and progress; ``run()`` trains to the end or a stopping criterion."""

    def __init__(self, config: TrainConfig, given: dict | None = None, argv: list[str] | None = None,
                 data: MNIST | None = None, world: distributed.World = distributed.LOCAL):
        given = given or {}
        self.folder, self.lock = locked_folder(config) if world.is_main else (None, None)
        try:
            self._start(config, given, argv, data, world)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the log and release the run folder; safe to call twice."""
        logger = getattr(self, "logger", None)
        if logger is not None:
            logger.close()
        if self.lock is not None:
            self.lock.release()

    def _start(self, config: TrainConfig, given: dict, argv: list[str] | None, data: MNIST | None,
               world: distributed.World) -> None:
        config, state, folder = resolve_resume(config, given)
        if config.input_transform == "auto":   # the run records the transform it used, not "auto"
            config = TrainConfig.from_dict({**config.to_dict(), "input_transform": config.resolved_input_transform()})
        self.config = config
        self.world = world
        if world.size > 1:
            if config.optimizer != "rso":
                raise ConfigError("the backprop baselines run in one process (drop --workers / torchrun)")
            config.workers = world.size
            distributed.set_threads(config.threads or DEFAULT_THREADS)   # one per worker: N workers for N cores
        else:
            torch.set_num_threads(config.threads or DEFAULT_THREADS)
        self.device = world.device if world.device.type == "cuda" else select_device(config.device)
        self.dtype = getattr(torch, config.dtype)
        if data is None:
            data = load_mnist(config.data_dir, config.train_subset, config.test_subset, download=config.download,
                              transform=config.input_transform)
        elif data.transform != config.input_transform:
            raise ConfigError(f"the data given was loaded with the {data.transform!r} input transform, but this run "
                              f"uses {config.input_transform!r}")
        try:
            config.validate(n_train=len(data.train_labels))
        except ValueError as error:
            raise ConfigError(str(error)) from None
        try:
            check_model_fits(config)
        except ResourceError as error:
            raise RunError(str(error)) from None
        self.data = data.to(self.device, self.dtype)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.model = build_model(config.model, self.generator, **config.model_options()).to(self.device, self.dtype)
        self.progress = Progress()
        self.resume_sweep: dict | None = None    # a checkpoint taken inside a sweep: where to go on
        self.bn_statistics_step: int | None = None
        self.stopping = StoppingCriteria(metric_above=config.target_accuracy, max_seconds=config.max_seconds)
        self.optimizer = None
        if config.optimizer != "rso":
            self.optimizer = make_optimizer(config.optimizer, self.model.parameters(), config.lr, config.momentum)
        if state is not None:
            self._restore(state)
            self.folder = folder
        elif not world.is_main:
            self.folder = None
        elif self.folder is None:
            name = config.name or f"{config.model}-{config.optimizer}-{time.strftime('%Y%m%d-%H%M%S')}"
            self.folder = unique_run_dir(config.run_dir, name)
            self.lock = RunFolderLock(self.folder)
        # else: --resume-if-exists on a folder without a checkpoint (locked above): nothing in it to lose
        self.folder = Path(world.broadcast(str(self.folder)))   # rank 0 chose it; the others name it in errors
        check_finite_weights(self.model.state_dict(), "weights at the start of the run")
        # only rank 0 logs, shows progress, holds the folder's lock and writes checkpoints
        self.logger = RunLogger(self.folder, printer=tqdm.write) if world.is_main else _NoLogger()
        session = self.logger.describe(config.to_dict(), self.device, argv,
                                       resumed_at=self.progress.visits if state is not None else None)
        session = session or {"code": UNRECORDED}   # ranks other than 0 record nothing
        # provenance of every session (start, then each resume) travels in the checkpoint too
        self.sessions = [*(state.get("provenance") or [] if state is not None else []),
                         {**session, "at_step": self.progress.visits}]
        self.code = session["code"]
        self.has_batchnorm = any(isinstance(module, BATCHNORMS) for module in self.model.modules())
        if state is None:
            self.logger.start_dashboard(config.to_dict(), self.has_batchnorm)
        else:
            self.announce_resume()

    def announce_resume(self) -> None:
        """Say which run goes on, from where, and whether anything is left to train."""
        progress, config = self.progress, self.config
        budget, unit = (config.cycles, "cycle") if config.optimizer == "rso" else (config.epochs, "epoch")
        where = f"{progress.cycle} of {budget} {unit}s done" + (
            f", next sweep {progress.target_index + 1}" if config.optimizer == "rso" and progress.target_index else "")
        self.logger.line(f"resuming {self.folder} ({where}, {progress.visits} weight updates)")
        if progress.cycle >= budget:
            self.logger.line(f"{self.folder} has already done its {budget} {unit}s: nothing to train, only the final "
                             f"evaluation (to go on, raise --{unit}s; to start afresh, give another --name)")

    # ---- checkpoints -----------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        return {"model": self.model.state_dict(), "config": self.config.to_dict(), "progress": self.progress.state(),
                "generator": self.generator.get_state(), "bn_statistics_step": self.bn_statistics_step,
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                "stopping": self.stopping.state_dict(), "provenance": self.sessions}

    def save(self, sweep: dict | None = None, generator: torch.Tensor | None = None) -> None:
        """Checkpoint; inside a sweep, ``sweep`` says how far it got and ``generator`` is its start state."""
        if not self.world.is_main:
            return
        state = self.checkpoint_state()
        if sweep is not None:   # the weights are part-way through a sweep: no BN statistics match them
            state.update(sweep=sweep, generator=generator, bn_statistics_step=None)
        save_checkpoint(state, self.folder / "checkpoint.pt")

    def _restore(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.progress = Progress(**state["progress"])
            self.generator.set_state(state["generator"])
            self.bn_statistics_step = state.get("bn_statistics_step")
            if self.optimizer is not None and state.get("optimizer"):
                self.optimizer.load_state_dict(state["optimizer"])
            if state.get("stopping"):
                self.stopping.load_state_dict(state["stopping"])
            self.resume_sweep = state.get("sweep")
        except Exception as error:      # whatever a damaged (but checksummed-away) field raises: one line
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(f"checkpoint does not fit this run: {first}") from None

    # ---- evaluation ------------------------------------------------------------------------------
    def evaluate(self, full: bool = False) -> tuple[float, float]:
        """Recompute BN statistics (all training examples if ``full``, else ``bn_samples``), then test.
        Rank 0 only (the others return NaN): evaluation decides nothing the search depends on."""
        if not self.world.is_main:
            return float("nan"), float("nan")
        images = self.data.train_images if full else self.data.train_images[: self.config.bn_samples]
        recalibrate_batchnorm(self.model, images)
        self.bn_statistics_step = self.progress.visits  # the saved BN statistics match these weights
        return evaluate(self.model, self.data.test_images, self.data.test_labels)

    def budget_done(self) -> float:
        """The fraction of the run's budget (cycles or epochs) done: one metric key for every optimizer."""
        if self.config.optimizer == "rso":
            return self.progress.visits / max(self.config.cycles * count_weights(self.model), 1)
        return self.progress.cycle / self.config.epochs

    def log_curves(self, step: int, samples: int, **values: float) -> None:
        """Scalars against weight updates (``step``) and their copies against forward samples."""
        for tag, value in values.items():
            self.logger.scalar(tag, value, step)
            if tag in tags.BY_SAMPLES:
                self.logger.scalar(tags.BY_SAMPLES[tag], value, samples)

    def log_evaluation(self, step: int, accuracy: float, test_loss: float) -> None:
        progress = self.progress
        self.log_curves(step, progress.forward_samples, **{tags.TEST_ACCURACY: accuracy, tags.TEST_LOSS: test_loss})
        for tag, value in ((tags.WEIGHT_UPDATES, progress.visits), (tags.FORWARD_SAMPLES, progress.forward_samples),
                           (tags.SECONDS, progress.seconds), (tags.DONE_FRACTION, self.budget_done())):
            self.logger.scalar(tag, value, step)

    def log_start(self) -> None:
        """Step 0 of a new run: the initial weights' test accuracy and loss, train loss and histograms."""
        accuracy, test_loss = self.evaluate()
        images, labels = self.data.train_images[: self.config.batch_size], self.data.train_labels[: self.config.batch_size]
        from rso.engines.base import batch_statistics

        with torch.no_grad(), batch_statistics(self.model):
            train_loss = torch.nn.functional.cross_entropy(self.model(images).double(), labels).item()
        self.log_curves(0, 0, **{tags.TRAIN_LOSS: train_loss})
        self.log_evaluation(0, accuracy, test_loss)
        for name, parameter in self.model.named_parameters():
            self.logger.histogram(tags.weights_tag(name), parameter, 0)

    def record(self, step: int, train_loss: float, accuracy: float, test_loss: float, **extra) -> None:
        self.log_evaluation(step, accuracy, test_loss)
        self.progress.history.append({"step": step, "seconds": round(self.progress.seconds, 3),
                                      "forward_samples": self.progress.forward_samples,
                                      "accepted": self.progress.accepted, "train_loss": train_loss,
                                      "test_accuracy": accuracy, "test_loss": test_loss, "code": self.code,
                                      **extra})

    # ---- training --------------------------------------------------------------------------------
    def run(self) -> dict:
        started = time.perf_counter()
        self.stopping.start()
        if self.config.optimizer == "rso":
            # SIGINT/SIGTERM from here to the final checkpoint (the step-0 evaluation, building the engine, the
            # final evaluation included) stop at the next visit, or after the final save, with a checkpoint
            # taken after the signal
            INTERRUPTS.defer(True)
        try:
            if self.progress.visits == 0:
                self.log_start()
            reason = self._run_rso() if self.config.optimizer == "rso" else self._run_backprop()
            accuracy, test_loss = self.evaluate(full=True)
            self.save()  # the final BN statistics go into the checkpoint that is evaluated independently
            if self.stop_requested():
                self.save()   # the signal may have come during the save above: the checkpoint postdates it
                raise StopRequested
        except (KeyboardInterrupt, StopRequested) as error:
            saved = "; a checkpoint was saved at this visit" if isinstance(error, StopRequested) else ""
            if (self.folder / "checkpoint.pt").is_file():
                message = (f"interrupted ({INTERRUPTS.name}){saved}; the last checkpoint is "
                           f"{self.folder / 'checkpoint.pt'} (resume with --resume {self.folder})")
            else:
                message = f"interrupted ({INTERRUPTS.name}) before the first checkpoint; nothing to resume in {self.folder}"
            raise RunInterrupted(message, INTERRUPTS.exit_status) from None
        except (NonFiniteLossError, FloatingPointError) as error:
            raise RunError(f"{error}; the last good checkpoint is {self.folder / 'checkpoint.pt'}") from None
        except Exception as error:
            if self.world.size == 1:
                raise
            # one worker failed (or lost its peer): say where the run can continue from
            raise RunError(f"{distributed.one_line(error)}; the last checkpoint is {self.folder / 'checkpoint.pt'} "
                           f"(resume with --resume {self.folder}, with any number of workers)") from None
        finally:
            INTERRUPTS.defer(False)
        metrics = {"test_accuracy": accuracy, "test_loss": test_loss, "visits": self.progress.visits,
                   "accepted": self.progress.accepted, "forward_samples": self.progress.forward_samples,
                   "optimizer_steps": self.progress.optimizer_steps, "seconds": round(self.progress.seconds, 2),
                   "cycles_done" if self.config.optimizer == "rso" else "epochs_done": self.progress.cycle,
                   "stopped_by": reason, "wall_seconds_this_session": round(time.perf_counter() - started, 2),
                   "code": run_code(self.sessions)}
        self.logger.scalar(tags.FINAL_ACCURACY, accuracy, self.progress.visits)
        self.logger.scalar(tags.FINAL_LOSS, test_loss, self.progress.visits)
        self.logger.line(f"final: test accuracy {accuracy:.4f}, test loss {test_loss:.4f}"
                         + (f" (BN statistics over all {len(self.data.train_labels)} training examples)"
                            if self.has_batchnorm else "")
                         + f"; run folder {self.folder}" + (f"; stopped: {reason}" if reason else ""))
        self.logger.finish(metrics)
        return {**metrics, "run_folder": str(self.folder), "history": list(self.progress.history)}

    def _stop_reason(self, loss: float, accuracy: float | None) -> str | None:
        """Decided on rank 0 (it holds the accuracy and the clock) and shared, so all ranks stop together."""
        reason = self.stopping.update(self.progress.visits, loss, accuracy) if self.world.is_main else None
        return self.world.broadcast(reason)

    def _run_rso(self) -> str | None:
        config, progress = self.config, self.progress
        try:
            engine = make_engine(config.engine, self.model, suffix_precision=config.suffix_precision,
                                 world=self.world if self.world.size > 1 else None)
        except ValueError as error:
            hint = " (--suffix-precision needs the fast engine)" if config.suffix_precision else ""
            raise RunError(f"{error}{hint}") from None
        if config.engine == "auto" or config.suffix_precision:
            self.logger.line(f"engine: {engine.name} ({config.engine})"
                             + (f", suffix in {config.suffix_precision}: decisions may differ from exact scoring"
                                if config.suffix_precision else ""))
        targets = visit_order(self.model, config.order, config.bn_sigma)
        # the authors' BN handling: the layers below the searched one normalize with these images' statistics
        fixed_bn_images = (self.data.train_images[:config.search_bn_images] if config.search_bn == "fixed-below"
                           else None)
        sampler = get_sampler(config.sampler)
        per_cycle = sum(target.numel for target in targets)
        self.logger.line(f"RSO on {config.model}: {per_cycle} weights a cycle in {len(targets)} tensors, "
                         f"{config.cycles} cycles, batch {config.batch_size}, device {self.device}, {config.dtype}, "
                         f"inputs {config.input_transform}, weight decay {config.weight_decay:g}, BN during the "
                         f"search: {config.search_bn}"
                         + (f" ({config.search_bn_images} images)" if config.search_bn == "fixed-below" else ""))
        if self.world.size > 1:
            self.logger.line(f"{self.world.size} workers ({'NCCL' if self.device.type == 'cuda' else 'gloo'}), "
                             f"each scoring {config.batch_size // self.world.size} or "
                             f"{-(-config.batch_size // self.world.size)} examples of every chunk")
            self.world.check_same(sum(float(p.detach().double().sum()) for p in self.model.parameters()),
                                  "the starting weights")
        costs = sweep_costs(self.model, targets, self.data.train_images[:1], config.batch_size,
                            len(self.data.train_labels), SCORINGS.get(engine.name, "incremental"),
                            fused_head=self.device.type == "cpu" and self.world.size == 1,
                            fill=fill_scale(config.search_bn, self.world.size),
                            statistics_samples=len(fixed_bn_images) if fixed_bn_images is not None else 0,
                            fold=engine.name == "fast")
        evaluation_samples = min(config.bn_samples, len(self.data.train_labels)) + len(self.data.test_labels)
        for target in (targets if config.eval_every == "sweep" else targets[-1:]):
            costs[target.name].after = evaluation_work(evaluation_samples, self.world.size)
        tracker = SweepProgress(costs, [target.name for target in targets], config.cycles, progress.sweep_seconds)
        # the bar counts forward-sample equivalents (rso.progress): its ETA is this run's own per-tensor timings
        resumed_visits = self.resume_sweep["visit"] if self.resume_sweep else 0   # a run resumed inside a sweep
        bar = tqdm(total=tracker.total, initial=tracker.done(progress.cycle, progress.target_index, resumed_visits),
                   unit="sample",
                   unit_scale=True, dynamic_ncols=True, disable=not config.progress or not self.world.is_main,
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]")
        window = {"visits": 0, "loss": 0.0, "in_sweep": 0}   # the train-loss curve: a point every LOSS_EVERY visits

        def log_train_loss() -> None:
            if window["visits"]:
                visits = progress.visits + window["in_sweep"]
                samples = progress.forward_samples + window["in_sweep"] * N_CANDIDATES * config.batch_size
                self.log_curves(visits, samples, **{tags.TRAIN_LOSS: window["loss"] / window["visits"]})
                window.update(visits=0, loss=0.0)

        def on_progress(visits: int, loss: float, accepted: int) -> None:
            tracker.advance(visits)
            window["visits"] += visits
            window["loss"] += loss * visits
            window["in_sweep"] += visits
            if window["visits"] >= LOSS_EVERY:
                log_train_loss()
            bar.update(tracker.done() - bar.n)
            bar.set_postfix({"eta": format_seconds(tracker.eta()), "loss": f"{loss:.4f}",
                             "accept": f"{accepted / max(visits, 1):.2f}"}, refresh=False)

        INTERRUPTS.defer(True)   # SIGINT/SIGTERM: checkpoint at the next visit, then stop
        self.world.watch(lambda: INTERRUPTS.requested is not None)     # each gather carries the flag (stop_seen)
        try:
            while progress.cycle < config.cycles:
                cycle = progress.cycle
                while progress.target_index < len(targets):
                    target = targets[progress.target_index]
                    sigma = annealed_sigma(target.sigma, cycle, config.cycles, config.final_sigma_fraction, config.anneal)
                    resumed, self.resume_sweep = self.resume_sweep, None
                    partial = None if resumed is None else \
                        SweepStats(target.name, sigma, resumed["visit"], resumed["accepted"], resumed["loss_sum"])
                    earlier = resumed["seconds"] if resumed else 0.0
                    sweep_start = time.perf_counter()
                    hook = self._sweep_checkpoint(target, self.generator.get_state(), sweep_start, earlier)
                    tracker.begin_sweep(cycle, progress.target_index)
                    tracker.visits = window["in_sweep"] = resumed["visit"] if resumed else 0
                    stats = run_sweep(self.model, target, self.data.train_images, self.data.train_labels, engine,
                                      sigma=sigma, batch_size=config.batch_size, sampler=sampler,
                                      generator=self.generator, weight_decay=config.weight_decay,
                                      chunking=config.chunking, progress=on_progress,
                                      fixed_bn_images=fixed_bn_images,
                                      start_visit=resumed["visit"] if resumed else 0, stats=partial, checkpoint=hook)
                    log_train_loss()
                    progress.visits += stats.visits
                    progress.accepted += stats.accepted
                    progress.forward_samples += stats.forward_samples
                    progress.target_index += 1
                    last_of_cycle = progress.target_index == len(targets)
                    if last_of_cycle:
                        progress.cycle, progress.target_index = cycle + 1, 0
                    step = progress.visits
                    self.logger.scalar(tags.accept_rate_tag(target.name), stats.accept_rate, step)
                    self.logger.scalar(tags.sigma_tag(target.name), sigma, step)
                    self.logger.scalar(tags.ACCEPTED, progress.accepted, step)
                    self.logger.histogram(tags.weights_tag(target.name), target.parameter, step)
                    accuracy = None
                    progress.seconds += earlier + time.perf_counter() - sweep_start
                    if config.eval_every == "sweep" or last_of_cycle:
                        accuracy, test_loss = self.evaluate()
                        self.record(step, stats.mean_loss, accuracy, test_loss, cycle=cycle, target=target.name)
                    tracker.end_sweep()
                    left = tracker.eta_after_sweep()
                    self.logger.line(
                        f"cycle {cycle + 1}/{config.cycles} {target.name:<12} sigma {sigma:.4f} "
                        f"accept {stats.accept_rate:.3f} loss {stats.mean_loss:.4f}"
                        + (f" test acc {accuracy:.4f}" if accuracy is not None else "")
                        + f" ({stats.seconds:.1f} s, {progress.seconds:.0f} s total)"
                        + (f" eta {format_seconds(left)}" if left is not None and not (
                            last_of_cycle and progress.cycle == config.cycles) else ""))
                    self.save()
                    if self.stop_requested():
                        self.save()   # the signal may have come during the save above: the checkpoint postdates it
                        raise StopRequested
                    reason = self._stop_reason(stats.mean_loss, accuracy)
                    if reason:
                        return reason
                    if last_of_cycle:
                        break
        finally:
            bar.close()
            self.world.watch(None)
        return None

    def stop_requested(self) -> bool:
        """Did SIGINT/SIGTERM ask the run to stop? With several workers, any rank's signal stops them all at
        the same visit (every rank calls this at the same points)."""
        return self.world.any(INTERRUPTS.requested is not None)

    def stop_seen(self) -> bool:
        """:meth:`stop_requested` between visits, with no collective of its own: with several workers, the
        flag that rides on every gather (``World.watch``), the same on every rank after the same visit."""
        if self.world.size == 1:
            return INTERRUPTS.requested is not None
        return self.world.flagged

    def _sweep_checkpoint(self, target, generator_state: torch.Tensor, sweep_start: float, earlier: float):
        """The hook ``run_sweep`` calls between visits: a checkpoint every ``checkpoint_every`` seconds and
        when a signal asked to stop (then :class:`StopRequested`)."""
        last_save = time.monotonic()

        def checkpoint(visit: int, stats: SweepStats) -> None:
            nonlocal last_save
            requested = self.stop_seen()
            if visit >= target.numel or not (requested or time.monotonic() - last_save >= self.config.checkpoint_every):
                return      # (the end of a sweep has its own checkpoint)
            self.save(sweep={"visit": visit, "accepted": stats.accepted, "loss_sum": stats.loss_sum,
                             "seconds": earlier + time.perf_counter() - sweep_start}, generator=generator_state)
            last_save = time.monotonic()
            if requested:
                raise StopRequested
        return checkpoint

    def _run_backprop(self) -> str | None:
        config, progress = self.config, self.progress
        n_weights = count_weights(self.model)
        steps_per_epoch = len(self.data.train_labels) // config.batch_size
        self.logger.line(f"{config.optimizer} on {config.model}: {n_weights} weights, {config.epochs} epochs of "
                         f"{steps_per_epoch} steps, batch {config.batch_size}, lr {config.lr}, device {self.device}")
        bar = tqdm(total=config.epochs * steps_per_epoch, initial=progress.optimizer_steps, unit="step",
                   dynamic_ncols=True, disable=not config.progress)
        every = max(1, min(LOSS_EVERY_STEPS, steps_per_epoch // 10))   # the train-loss curve: a point every few dozen steps
        test_every = max(1, steps_per_epoch // TESTS_PER_EPOCH)      # and a test point a few times an epoch
        window = {"steps": 0, "loss": 0.0, "in_epoch": 0, "test_seconds": 0.0}

        def on_progress(loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            window["steps"] += 1
            window["loss"] += loss
            window["in_epoch"] += 1
            if window["steps"] >= every:
                self.log_curves(progress.visits + window["in_epoch"] * n_weights,
                                progress.forward_samples + 2 * window["in_epoch"] * config.batch_size,
                                **{tags.TRAIN_LOSS: window["loss"] / window["steps"]})
                window.update(steps=0, loss=0.0)
            if window["in_epoch"] % test_every == 0 and window["in_epoch"] < steps_per_epoch:
                # TensorBoard only (the history and the comparisons keep one evaluation per epoch); evaluating
                # restores train mode and touches only BN running statistics, never the weights
                test_start = time.perf_counter()
                accuracy, test_loss = self.evaluate()
                self.log_curves(progress.visits + window["in_epoch"] * n_weights,
                                progress.forward_samples + 2 * window["in_epoch"] * config.batch_size,
                                **{tags.TEST_ACCURACY: accuracy, tags.TEST_LOSS: test_loss})
                window["test_seconds"] += time.perf_counter() - test_start

        try:
            while progress.cycle < config.epochs:
                epoch_start = time.perf_counter()
                window.update(steps=0, loss=0.0, in_epoch=0, test_seconds=0.0)
                loss, steps = train_epoch(self.model, self.optimizer, self.data.train_images, self.data.train_labels,
                                          config.batch_size, self.generator, on_progress)
                if window["steps"]:
                    rest = window["loss"] / window["steps"]
                    self.log_curves(progress.visits + steps * n_weights, progress.forward_samples + 2 * steps * config.batch_size,
                                    **{tags.TRAIN_LOSS: rest})
                progress.optimizer_steps += steps
                progress.visits += steps * n_weights
                progress.forward_samples += 2 * steps * config.batch_size
                progress.cycle += 1
                progress.seconds += time.perf_counter() - epoch_start - window["test_seconds"]
                accuracy, test_loss = self.evaluate()
                self.record(progress.visits, loss, accuracy, test_loss, epoch=progress.cycle)
                for name, parameter in self.model.named_parameters():
                    self.logger.histogram(tags.weights_tag(name), parameter, progress.visits)
                self.logger.line(f"epoch {progress.cycle}/{config.epochs} loss {loss:.4f} test acc {accuracy:.4f} "
                                 f"({progress.seconds:.0f} s total)")
                self.save()
                reason = self._stop_reason(loss, accuracy)
                if reason:
                    return reason
        finally:
            bar.close()
        return None


def run_code(sessions: list[dict]) -> str:
    """The code labels of a run's sessions joined by '+' (``abc1234``, ``abc1234+def5678-dirty``), in order;
    a run resumed from a checkpoint that predates recorded provenance starts with ``unrecorded``."""
    if not sessions:
        return UNRECORDED
    codes = [session.get("code", UNRECORDED) for session in sessions]
    if sessions[0].get("at_step", 0) > 0:
        codes.insert(0, UNRECORDED)
    return "+".join(dict.fromkeys(codes))


def train(config: TrainConfig, given: dict | None = None, argv: list[str] | None = None,
          data: MNIST | None = None, world: distributed.World = distributed.LOCAL) -> dict:
    """Train as ``config`` says and return the final metrics (see :class:`Trainer`); ``world``: this
    process's rank among the workers of a multi-process run (:mod:`rso.distributed`)."""
    trainer = Trainer(config, given, argv, data, world)
    try:
        return trainer.run()
    finally:
        trainer.close()


def exit_status(run) -> int:
    """Call ``run()``; an interrupt, bad data, a bad checkpoint or a failed run ends in one line on stderr and
    an exit status (130 interrupted, 2 error) instead of a traceback. Returns ``run()``'s status or 0."""
    try:
        return run() or 0
    except RunInterrupted as error:
        print(f"{error}", file=sys.stderr)
        return error.status
    except KeyboardInterrupt:         # before the first sweep or during the final evaluation
        signal_name = f" ({INTERRUPTS.name})" if INTERRUPTS.received else ""
        print(f"interrupted{signal_name}; checkpoints already written are kept", file=sys.stderr)
        return INTERRUPTS.exit_status
    except (DataError, CheckpointError, RunError, StorageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:          # an unwritable --run-dir, a full disk
        print(f"error: {error}", file=sys.stderr)
        return 2


def run_worker(argv: list[str] | None) -> int:
    """One rank of a multi-process run (``--workers N`` or torchrun): join the process group, train, and
    leave the group on every exit path. Errors propagate (the launcher reports them in one line)."""
    config, given, _ = parse_args(argv)
    world = distributed.init_world(select_device(config.device))
    try:
        with INTERRUPTS.installed():   # SIGINT/SIGTERM: every rank stops at the same visit, rank 0 saves
            train(config, given, argv, world=world)
    except BaseException as error:
        distributed.stamp_failure(error)
        raise
    finally:
        distributed.close_world(world)
    return 0


def run_under_torchrun(argv: list[str] | None) -> int:
    """torchrun started this rank: report a failure in one line naming the rank; torchrun ends the others."""
    rank, size = os.environ.get("RANK", "?"), os.environ.get("WORLD_SIZE", "?")
    try:
        return run_worker(argv)
    except (KeyboardInterrupt, RunInterrupted) as error:
        print(f"worker rank {rank} of {size}: {error or 'interrupted'}", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - one line, not a traceback per rank
        print(f"error: worker rank {rank} of {size}: {distributed.one_line(error)}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    config, given, parser = parse_args(argv)
    if config.engine not in ("auto", *ENGINES):
        parser.error(f"unknown engine {config.engine!r}; choose one of auto, {', '.join(ENGINES)}")
    size = distributed.environment_world_size()
    if size > 1:   # started by torchrun (env:// rendezvous)
        if "workers" in given and config.workers != size:
            parser.error(f"--workers {config.workers} under a launcher that started {size} processes")
        if config.optimizer != "rso":
            parser.error("the backprop baselines run in one process (not under torchrun)")
        return run_under_torchrun(argv)
    if config.workers > 1:
        return distributed.launch(config.workers, run_worker, (argv if argv is not None else sys.argv[1:],))

    def run() -> None:
        try:
            train(config, given, argv)
        except ConfigError as error:      # config checks that need the data (batch size vs training set)
            parser.error(str(error))
    with INTERRUPTS.installed():
        return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
