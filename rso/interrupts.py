"""SIGINT and SIGTERM for a training run: stop at a point where a checkpoint can be taken.

While :meth:`Interrupts.defer` is on (a run's training loop), the first SIGINT or SIGTERM only records
the signal; the loop checks :attr:`Interrupts.requested` between weight visits, writes a checkpoint at that
visit and stops. Outside it, or on a second signal, the signal raises ``KeyboardInterrupt`` at once (the last
checkpoint stands). The exit status is 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SignalInterrupt(KeyboardInterrupt):
    """What a signal raises outside :meth:`Interrupts.defer`: a ``KeyboardInterrupt`` (every ``except
    KeyboardInterrupt`` catches it), but not exactly one. Under ``python -m``, CPython remembers a plain
    ``KeyboardInterrupt`` that passed through C code evaluating Python (``PyRun_String``: some extension
    modules run their set-up that way) even when it was caught later, and then ends the process by SIGINT,
    replacing the exit status 143 of a SIGTERM with -2. It checks the exact type, so a subclass is immune."""


class StopRequested(Exception):
    """Raised by the training loop after it saved a checkpoint because a signal asked it to stop."""


class Interrupts:
    def __init__(self) -> None:
        self.requested: int | None = None    # the signal that asked the run to stop at the next visit
        self.received: int | None = None     # the last signal received at all
        self._deferring = False
        self._previous: dict = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "interrupt"

    @property
    def exit_status(self) -> int:
        return 128 + (self.received or signal.SIGINT)

    def _handle(self, signum, frame) -> None:
        self.received = signum
        if self._deferring and self.requested is None:
            self.requested = signum
            return
        raise SignalInterrupt(f"interrupted ({signal.Signals(signum).name}); checkpoints already written are kept")

    @contextlib.contextmanager
    def installed(self) -> Iterator["Interrupts"]:
        """Handle SIGINT and SIGTERM (main thread only; elsewhere Python's default handling stays)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        self.requested = self.received = None
        self._previous = {signum: signal.signal(signum, self._handle) for signum in SIGNALS}
        try:
            yield self
        finally:
            for signum, previous in self._previous.items():
                signal.signal(signum, previous)

    def defer(self, on: bool) -> None:
        """While on, a first signal is recorded instead of raised: the caller checks :attr:`requested`."""
        self._deferring = on


# The process's handler: ``python -m rso.train`` installs it; the training loop defers to it.
INTERRUPTS = Interrupts()
