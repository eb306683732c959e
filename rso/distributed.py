"""Data-parallel exact scoring on torch.distributed: what is reduced, in which order, in which dtype.

A visit's decision needs sums over the examples of its chunk. With N workers every rank holds a contiguous
share of every chunk (the chunk partition is drawn from the same seeded generator on every rank), computes
its share's partial sums, and the engines ask this module for the totals:

- the candidates' loss sums (float64), once per visit;
- for train-mode BatchNorm, each BN layer's per-channel batch statistics (per candidate: the candidates are
  columns of one tensor), before it normalizes. Each rank sends (count, mean, variance) of its share in
  float64; the totals are combined with Chan's parallel formula, which is stable where raw sums of squares
  would cancel.

Every reduction is an ``all_gather`` followed by a sum in rank order, done identically on every rank, so all
ranks hold bit-identical totals whatever the backend's reduction algorithm, and take the same decision.
A world of one (:data:`LOCAL`) is the same code with no-op reductions: torch's own ``batch_norm`` and the
local sums, which is what the single-process exactness tests check.

Process groups: gloo on CPU, NCCL on CUDA; ``python -m rso.train --workers N`` starts N local processes
(:func:`launch`), ``torchrun --nproc-per-node N -m rso.train`` starts them itself (env:// rendezvous:
``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``).
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing
import os
import signal
import socket
import sys
import time
import traceback
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


class WorkerFailed(RuntimeError):
    """A worker of a multi-process run raised or died; the message names its rank."""


class InjectedFault(RuntimeError):
    """Raised on purpose by ``RSO_FAULT_RANK`` (tests of the failure path)."""


class World:
    """This process's place among the workers of a run, and the reductions the engines ask for.

    ``World()`` is a world of one: every reduction returns its input. :func:`init_world` returns a World over
    the default process group.
    """

    def __init__(self, rank: int = 0, size: int = 1, device: torch.device | None = None, group=None):
        self.rank, self.size = rank, size
        self.device = device or torch.device("cpu")     # where NCCL wants the tensors it reduces
        self.group = group      # a one-thread gloo backend for the per-visit gathers on CPU (None: the default group)
        self._watched: Callable[[], bool] | None = None
        self.flagged = False    # see watch()
        self.collectives = 0
        fault = os.environ.get("RSO_FAULT_RANK")
        self._fault_rank = int(fault) if fault not in (None, "") else None
        self._fault_after = int(os.environ.get("RSO_FAULT_AFTER", "0"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that logs, shows progress and writes checkpoints."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size})"

    def watch(self, flag: Callable[[], bool] | None) -> None:
        """Carry this rank's ``flag()`` (e.g. "a signal asked this process to stop") on every :meth:`gather`
        from now on: :attr:`flagged` becomes true on every rank, at the same gather, once any rank's flag was
        true. It costs no collective of its own, where a per-visit :meth:`any` cost one (about 1 ms with gloo
        on a 2-core machine: a 2-worker ``oneconv`` sweep took 1.5x as long). ``None`` stops watching."""
        self._watched, self.flagged = flag, False

    # ------------------------------------------------------------------------------------------ reductions
    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """(size, ...) float64: every rank's ``local``, stacked in rank order (on the CPU)."""
        if self.size == 1:
            return local.detach().to("cpu", torch.float64).unsqueeze(0)
        self.collectives += 1
        if self._fault_rank == self.rank and self.collectives > self._fault_after:
            if os.environ.get("RSO_FAULT_MODE") == "exit":
                os._exit(3)   # a worker that dies without a word (killed, out of memory)
            raise InjectedFault(f"injected fault at collective {self.collectives} (RSO_FAULT_RANK={self.rank})")
        import torch.distributed as dist

        shape = local.shape
        flat = local.detach().to(self.device, torch.float64).reshape(-1)
        if self._watched is not None:   # one more element: this rank's flag
            flat = torch.cat([flat, flat.new_full((1,), 1.0 if self._watched() else 0.0)])
        flat = flat.contiguous()
        parts = [torch.empty_like(flat) for _ in range(self.size)]
        if self.group is not None:
            self.group.allgather([parts], [flat]).wait()
        else:
            dist.all_gather(parts, flat)
        gathered = torch.stack(parts).cpu()
        if self._watched is not None:
            self.flagged = self.flagged or bool(gathered[:, -1].any())
            gathered = gathered[:, :-1]
        return gathered.reshape(self.size, *shape)

    def sum(self, local: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``local`` (float64, summed in rank order); ``local`` itself in a world of one."""
        if self.size == 1:
            return local
        gathered = self.gather(local)
        total = gathered[0].clone()
        for part in gathered[1:]:
            total += part
        return total.to(local.device)

    def combine_moments(self, count: int, mean, variance):
        """Global per-channel (mean, variance) from this rank's share: ``count`` examples (times pixels) with
        per-channel ``mean`` and biased ``variance`` (float64, numpy or torch). Chan's formula, rank order."""
        if self.size == 1:
            return mean, variance
        as_numpy = isinstance(mean, np.ndarray)
        mean_t = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        variance_t = torch.as_tensor(variance, dtype=torch.float64).reshape(-1)
        counts = torch.full_like(mean_t, float(count))
        gathered = self.gather(torch.stack([counts, mean_t, variance_t]))   # (size, 3, C)
        n, means, variances = gathered[:, 0], gathered[:, 1], gathered[:, 2]
        total = n.sum(0)
        global_mean = (n * means).sum(0) / total
        global_variance = (n * (variances + (means - global_mean) ** 2)).sum(0) / total
        if as_numpy:
            return global_mean.numpy(), global_variance.numpy()
        return global_mean.to(mean.device), global_variance.to(mean.device)

    def batch_norm(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float) -> torch.Tensor:
        """Train-mode batch normalization of ``x`` (N, C, ...) with the statistics of the whole chunk (all
        ranks' shares); no running statistics. A world of one is ``F.batch_norm`` itself.

        This rank's moments come from one float64-accumulating pass (numba on CPU, in ``x``'s own layout; a
        float64 ``var_mean`` elsewhere); the combined statistics then normalize ``x`` in one more pass
        (``F.batch_norm`` in inference form). A float64 copy of ``x`` and a separate scale-and-shift made this
        2.9x slower per example than one process's ``F.batch_norm`` in a cache fill."""
        if self.size == 1:
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
        mean, variance, count = local_moments(x)
        return _normalize(x, *self.combine_moments(count, mean, variance), weight, bias, eps)

    def batch_norm_columns(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                           eps: float) -> torch.Tensor:
        """Train-mode BN of ``x`` (N, K, ...) whose K columns hold the same values (one channel, expanded:
        the candidates of a searched BN's weight or bias differ only in ``weight``/``bias``, one entry per
        column). The statistics are those of the first column, reduced once (one float64-accumulating pass
        over this rank's share, combined over the ranks); then the inference form. A world of one takes the
        same path, so 1 and N workers run the same arithmetic."""
        column = x[:, :1]
        mean, variance, count = local_moments(column if column.is_contiguous() else column.contiguous())
        return _normalize(x, *self.combine_moments(count, mean, variance), weight, bias, eps)

    @contextlib.contextmanager
    def batch_statistics(self, model: nn.Module, fixed: dict | None = None) -> Iterator[None]:
        """``rso.engines.base.batch_statistics`` (BN on batch statistics, running statistics untouched), with
        every BN layer of ``model`` normalizing by the whole chunk's statistics when there are several ranks.
        The BN layers in ``fixed`` normalize with the statistics given there (the same on every rank)."""
        from rso.engines.base import batch_statistics

        fixed = fixed or {}
        with batch_statistics(model, fixed):
            if self.size == 1:
                yield
                return
            patched = [module for module in model.modules() if isinstance(module, BATCHNORMS) and module not in fixed]
            try:
                for module in patched:
                    module.forward = (lambda x, module=module:
                                      self.batch_norm(x, module.weight, module.bias, module.eps))
                yield
            finally:
                for module in patched:
                    module.__dict__.pop("forward", None)

    # ------------------------------------------------------------------------------------------ agreement
    def broadcast(self, value):
        """Rank 0's ``value`` (any picklable object) on every rank: decisions that depend on time or on
        rank 0's evaluation (stopping) are taken once."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any: a stop (a signal one rank received) that every rank
        takes at the same visit. One small all-reduce; not counted in :attr:`collectives`."""
        if self.size == 1:
            return flag
        import torch.distributed as dist

        box = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        return bool(box.item())

    def check_same(self, value: float, what: str) -> None:
        """Raise when the ranks disagree on ``value`` (e.g. a checksum of the starting weights)."""
        if self.size == 1:
            return
        values = self.gather(torch.tensor([float(value)]))[:, 0].tolist()
        if any(v != values[0] for v in values):
            raise WorkerFailed(f"the workers disagree on {what}: {values}")

    def share(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a chunk's ``rows`` (sizes differ by at most one)."""
        if self.size == 1:
            return rows
        n = rows.numel()
        return rows[n * self.rank // self.size:n * (self.rank + 1) // self.size]


def _normalize(x: torch.Tensor, mean, variance, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """``x`` (N, C, ...) normalized by the given per-channel statistics (float64, numpy or torch; one value is
    every channel's): ``F.batch_norm`` in inference form. Half-precision inputs (autocast's suffix) normalize
    with float32 statistics, as their BN parameters are."""
    stat = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1).to(x.device, stat).expand(x.shape[1])
    variance = torch.as_tensor(variance, dtype=torch.float64).reshape(-1).to(x.device, stat).expand(x.shape[1])
    return F.batch_norm(x, mean, variance, weight, bias, False, 0.0, eps)


def local_moments(x: torch.Tensor):
    """This process's per-channel (mean, biased variance) of ``x`` (N, C, ...), accumulated in float64, and
    the count per channel."""
    from rso.engines import kernels

    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and kernels.available():
        return kernels.moments(x)
    dims = [0] + list(range(2, x.dim()))
    variance, mean = torch.var_mean(x.to(torch.float64), dim=dims, unbiased=False)
    return mean, variance, x.numel() // x.shape[1]


LOCAL = World()


def environment_world_size() -> int:
    """WORLD_SIZE when this process was started by torchrun (or another env:// launcher), else 1."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1
    except ValueError:
        return 1


def set_threads(count: int) -> None:
    """``count`` torch and numba threads. numba's pool resets torch's OpenMP thread count when it starts, so
    numba is imported and sized first, then torch."""
    try:
        import numba

        numba.set_num_threads(max(1, min(count, numba.config.NUMBA_NUM_THREADS)))
    except ImportError:
        pass
    torch.set_num_threads(count)


def init_world(device: torch.device, rank: int | None = None, size: int | None = None,
               init_method: str = "env://", timeout_s: float | None = None) -> World:
    """Join the process group (gloo on CPU, NCCL on CUDA) and return this process's World.

    ``rank``/``size`` default to the environment's RANK/WORLD_SIZE (torchrun). On CUDA each rank takes
    ``cuda:LOCAL_RANK``. ``RSO_DIST_TIMEOUT`` (seconds, default 1800) bounds how long a collective waits.
    """
    import torch.distributed as dist

    rank = int(os.environ["RANK"]) if rank is None else rank
    size = int(os.environ["WORLD_SIZE"]) if size is None else size
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timeout_s if timeout_s is not None else float(os.environ.get("RSO_DIST_TIMEOUT", "1800"))
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=timeout))
    if backend == "nccl":
        return World(rank, size, device)
    return World(rank, size, torch.device("cpu"), group=_one_thread_gloo(rank, size, timeout))


def _one_thread_gloo(rank: int, size: int, timeout: float):
    """A second gloo backend over the default group's store, with one worker thread where gloo's default
    has two. The engines' gathers are small and many (about six a visit); on a 2-core machine an idle gather
    of three candidates' statistics took 371-405 us and 266 us of CPU with one thread, 684-782 us and 436-531 us
    with the default group (``python benchmarks/gloo_latency.py``). Its devices are the default group's:
    ``GLOO_SOCKET_IFNAME``'s interfaces when set, else the host's default. ``RSO_GLOO_THREADS`` overrides the
    count (0: the default group); every rank must see the same value."""
    import torch.distributed as dist

    text = os.environ.get("RSO_GLOO_THREADS", "1")
    try:
        threads = int(text)
    except ValueError:
        raise ValueError(f"RSO_GLOO_THREADS must be a whole number (0: the default group), got {text!r}") from None
    if threads <= 0:
        return None
    options = dist.ProcessGroupGloo._Options()
    options._threads = threads
    options._timeout = datetime.timedelta(seconds=timeout)
    interfaces = [name for name in os.environ.get("GLOO_SOCKET_IFNAME", "").split(",") if name]
    options._devices = ([dist.ProcessGroupGloo.create_device(interface=name) for name in interfaces]
                        or [dist.ProcessGroupGloo.create_default_device()])
    store = dist.PrefixStore("rso_gathers/", dist.distributed_c10d._get_default_store())
    return dist.ProcessGroupGloo(store, rank, size, options)


def stamp_failure(error: BaseException) -> None:
    """Note when ``error`` happened, before the process group goes down: its peers fail a moment later on
    the lost connection, and the launcher names the earliest failure as the cause."""
    with contextlib.suppress(AttributeError, TypeError):
        if not hasattr(error, "failed_at"):
            error.failed_at = time.time()


def close_world(world: World) -> None:
    """``destroy_process_group`` if one is up; safe on every exit path."""
    if world.size == 1:
        return
    import torch.distributed as dist

    world.group = None      # the gathers' own backend goes with its last reference
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- launcher
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    name = "KeyboardInterrupt" if isinstance(error, KeyboardInterrupt) else type(error).__name__  # (its subclasses)
    return f"{name}: {text[0]}" if text else name


def _die_with(parent: int) -> None:
    """End this worker (SIGTERM: checkpoint at the next visit, then stop) when the launcher dies, even by
    SIGKILL: Linux's PR_SET_PDEATHSIG. Elsewhere a no-op (the launcher then ends its workers itself)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)    # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:           # the launcher died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


def _worker(rank: int, size: int, port: int, report, target: Callable, args: tuple, parent: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A session of its own: a terminal's Ctrl-C reaches the launcher alone, which passes each signal on to
    # every worker exactly once (a second one would end a worker before it saved).
    os.setsid()
    _die_with(parent)
    # tqdm's default lock is a multiprocessing semaphore, which os._exit below would leave for the launcher's
    # resource tracker to report as leaked: a worker's bars need only a thread lock
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    try:
        status = target(*args) or 0
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException as error:  # noqa: BLE001 - reported to the launcher in one line, then the process ends
        with contextlib.suppress(OSError):   # (a launcher that was killed reads nothing)
            report.send((getattr(error, "failed_at", time.time()), rank, one_line(error), traceback.format_exc()))
        status = getattr(error, "status", 1) if isinstance(getattr(error, "status", None), int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def launch(size: int, target: Callable, args: tuple = (), grace_s: float = 10.0) -> int:
    """Run ``target(*args)`` in ``size`` local processes (ranks 0..size-1, rendezvous on a free localhost
    port) and supervise them: when one fails, the others are ended (SIGTERM, then SIGKILL after ``grace_s``)
    and one line names the failed rank. SIGINT/SIGTERM sent to the launcher are passed on to every worker
    (they stop together at the next visit, rank 0 checkpoints), and the launcher waits for them. Returns the
    run's exit status (0 when every rank returned 0; 128 + the signal when a signal stopped it)."""
    context = multiprocessing.get_context("spawn")
    pipes = [context.Pipe(duplex=False) for _ in range(size)]    # (receive, send): a failure's one line
    port = _free_port()
    processes = [context.Process(target=_worker, args=(rank, size, port, pipes[rank][1], target, args, os.getpid()))
                 for rank in range(size)]
    signaled: list[int] = []

    def forward(signum, frame) -> None:
        signaled.append(signum)
        for process in processes:
            if process.pid is not None and process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)} \
        if threading_main() else {}
    try:
        for process in processes:
            process.start()
        failed: tuple[int, int] | None = None
        while any(process.is_alive() for process in processes):
            for rank, process in enumerate(processes):
                if process.exitcode not in (None, 0) and failed is None:
                    failed = (rank, process.exitcode)
            if failed is not None and not signaled:
                break      # a failure: end the others below. After a signal every rank stops on its own.
            time.sleep(0.05)
        if failed is None:
            for rank, process in enumerate(processes):
                process.join()
                if process.exitcode != 0 and failed is None:
                    failed = (rank, process.exitcode)
        codes = [process.exitcode for process in processes]   # before the survivors are ended below
        _end(processes, grace_s)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    reports = sorted(receive.recv() for receive, _ in pipes if receive.poll())
    if signaled and failed is not None:    # (a run that finished before the signal reached it: status 0)
        stopped = 128 + signaled[0]
        main = [line for _, rank, line, _ in reports if rank == 0]
        if main and main[0].startswith(("KeyboardInterrupt", "RunInterrupted")):
            print(main[0].split(": ", 1)[-1], file=sys.stderr)
        elif main:
            print(f"error: worker rank 0 of {size} failed: {main[0]}; the other workers were stopped", file=sys.stderr)
            return 2
        else:
            print(f"interrupted ({signal.Signals(signaled[0]).name}); checkpoints already written are kept",
                  file=sys.stderr)
        return stopped
    if failed is None:
        return 0
    reported = {rank for _, rank, _, _ in reports}
    # the cause: a worker that died without a word (its peers then fail on the lost connection), else the
    # first one that reported an error
    silent = [rank for rank, code in enumerate(codes) if code not in (None, 0, 130, 143) and rank not in reported]
    if silent:
        rank = failed[0] if failed[0] in silent else silent[0]
        code = codes[rank]
        how = f"died ({signal.Signals(-code).name})" if code < 0 else f"exited with status {code}"
        print(f"error: worker rank {rank} of {size} {how}; the other workers were stopped", file=sys.stderr)
        return 2
    if reports:
        _, rank, line, _ = reports[0]
        if line.startswith(("KeyboardInterrupt", "RunInterrupted")):   # a signal sent to a worker itself
            print(line.split(": ", 1)[-1], file=sys.stderr)
            return failed[1] if failed[1] in (130, 143) else 130
        print(f"error: worker rank {rank} of {size} failed: {line}; the other workers were stopped",
              file=sys.stderr)
        return 2
    return failed[1] if failed[1] in (130, 143) else 2


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _end(processes, grace_s: float) -> None:
    """Give the processes still alive ``grace_s`` to exit after SIGTERM, then SIGKILL them; reap all."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
