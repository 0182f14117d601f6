"""Stopping a run cleanly: on SIGINT (Ctrl-C), SIGTERM, SIGUSR1/SIGUSR2 (what Slurm or submitit send before
a time-out) or when the time budget `trainer.max_time` is spent.

A handler only records the request; the training loop looks at it after each optimizer step, agrees on it
across ranks (the signal may reach one rank only), writes `last.ckpt` and ends. A second Ctrl-C exits at
once. A handler that was installed before ours (submitit's, which requeues the job) is called after the
checkpoint is written, so a launcher's own pre-emption handling still runs.
"""

from __future__ import annotations

import os
import re
import signal
import time

from diffuse.errors import DiffuseError
from diffuse.training.distributed import DistInfo, all_reduce_max

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2") if hasattr(signal, name))
TIME_BUDGET = 1  # reason codes, agreed by max over ranks: a signal outranks the budget
_CODES = {sig: 2 + i for i, sig in enumerate(SIGNALS)}
_NAMES = {code: signal.Signals(sig).name for sig, code in _CODES.items()}


class Interrupted(DiffuseError):
    """A run stopped by a signal after writing its checkpoint; exits with 128 + the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def parse_max_time(value) -> float | None:
    """trainer.max_time → seconds: null, minutes as a number, or Lightning's "DD:HH:MM:SS"."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value) * 60
    elif isinstance(value, str) and re.fullmatch(r"\d+:\d{1,2}:\d{1,2}:\d{1,2}", value.strip()):
        d, h, m, s = (int(p) for p in value.strip().split(":"))
        seconds = float(((d * 24 + h) * 60 + m) * 60 + s)
    else:
        seconds = float("nan")
    if not seconds > 0:  # also NaN
        raise DiffuseError(f"trainer.max_time must be minutes (a number > 0) or DD:HH:MM:SS, or null; got {value}")
    return seconds


class StopRequest:
    """Collects stop requests during `with StopRequest(...)`: `check()` after each step says whether to stop."""

    def __init__(self, dist: DistInfo, max_time_s: float | None = None):
        self.dist = dist
        self.deadline = None if max_time_s is None else time.monotonic() + max_time_s
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        try:
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (e.g. a launcher running jobs in threads): no handlers
            self._previous.clear()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            os._exit(130)  # a second Ctrl-C: out at once, without the checkpoint
        self.signum = self.signum or signum

    def check(self) -> int:
        """0 = go on; else the reason code (TIME_BUDGET or a signal's), the same on every rank."""
        code = _CODES.get(self.signum, 0)
        if not code and self.deadline is not None and time.monotonic() >= self.deadline:
            code = TIME_BUDGET
        return all_reduce_max(code, self.dist)

    @staticmethod
    def describe(code: int) -> str:
        return "the time budget (trainer.max_time)" if code == TIME_BUDGET else _NAMES.get(code, "a signal")

    def signal_of(self, code: int) -> int | None:
        return next((sig for sig, c in _CODES.items() if c == code), None)

    def chain(self, code: int) -> None:
        """Call the handler that was there before ours for this signal (submitit's requeue), if any."""
        sig = self.signal_of(code)
        previous = self._previous.get(sig)
        if callable(previous) and previous not in (signal.default_int_handler,):
            previous(sig, None)
