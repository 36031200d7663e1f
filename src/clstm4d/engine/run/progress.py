"""Progress and threads where jobs run: a progress bar on a terminal, a line now and then in a
redirected log (a cluster job's output file, ``make demo > log``), and a warning when more
threads are asked for than the machine has free cores.

Examples:
    >>> import io
    >>> log, clock = io.StringIO(), iter([0.0, 1.0, 2.0, 30.0, 95.0, 96.0]).__next__
    >>> with Progress(5, desc="train", stream=log, every_seconds=60, clock=clock) as p:
    ...     for step in range(5):
    ...         p.update(loss="0.5")
    >>> print(log.getvalue(), end="")
    train: step 1/5 (20%), loss 0.5, 1.00 s/step, ETA 4s
    train: step 4/5 (80%), loss 0.5, 23.75 s/step, ETA 24s
    train: step 5/5 (100%), loss 0.5, 19.20 s/step, done in 1m36s
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["LOG_SECONDS", "Progress", "check_threads", "free_cores", "on_terminal"]

log = logging.getLogger(__name__)

#: seconds between two progress lines in a redirected log
LOG_SECONDS = 60.0


def on_terminal(stream: Any = None) -> bool:
    """Whether ``stream`` (default ``sys.stderr``) is a terminal (where a bar may redraw)."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


class Progress:
    """Progress of ``total`` steps: a ``tqdm`` bar when ``stream`` is a terminal; else (a log
    file, a pipe) one line at the first step, then at most one every ``every_seconds`` (and
    a tenth of the steps, see :meth:`_due`), and one at the last step: the step, the values
    given (``loss=...``), the time per step and the
    time left (``log_lines=False``: nothing in a log). ``enabled=False`` shows nothing. A
    context manager (closed on the way out, also when an exception passes, so the bar never
    redraws after a final message)."""

    def __init__(self, total: int, *, desc: str, unit: str = "step", initial: int = 0,
                 enabled: bool = True, stream: TextIO | None = None,
                 every_seconds: float | None = None, log_lines: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.desc, self.unit = int(total), desc, unit
        self.n = self.first = int(initial)
        self.stream = sys.stderr if stream is None else stream
        self.every = LOG_SECONDS if every_seconds is None else float(every_seconds)
        self.clock, self.t0, self.last = clock, clock(), None
        self.bar = None
        terminal = on_terminal(self.stream)
        self.lines = enabled and log_lines and not terminal
        if enabled and terminal:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.n, desc=desc, unit=unit,
                            dynamic_ncols=True, file=self.stream)

    def update(self, n: int = 1, **values: Any) -> None:
        """``n`` more steps done; ``values`` are shown beside the count."""
        self.n += n
        if self.bar is not None:
            if values:
                self.bar.set_postfix(values, refresh=False)
            self.bar.update(n)
        elif self.lines:
            now = self.clock()
            if self.last is None or self.n >= self.total or self._due(now):
                self._line(now, values)

    def _due(self, now: float) -> bool:
        """A line every ``every_seconds`` once a tenth of the steps is done since the last one
        (so a run's log holds about a dozen), and every ten times ``every_seconds`` anyway."""
        waited = now - self.last
        return (waited >= self.every and self.n - self.last_n >= -(-self.total // 10)) or \
            waited >= 10 * self.every

    def _line(self, now: float, values: dict[str, Any]) -> None:
        done, elapsed = self.n - self.first, now - self.t0
        rate = elapsed / done if done > 0 else 0.0
        left = (f"done in {_duration(elapsed)}" if self.n >= self.total
                else f"ETA {_duration(rate * (self.total - self.n))}")
        parts = [f"{self.desc}: {self.unit} {self.n}/{self.total} "
                 f"({100 * self.n // max(1, self.total)}%)",
                 *(f"{k} {v}" for k, v in values.items()), f"{rate:.2f} s/{self.unit}", left]
        self.write(", ".join(parts))
        self.last, self.last_n = now, self.n

    def write(self, message: str) -> None:
        """A line of its own (above the bar on a terminal)."""
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        elif self.lines:
            self.stream.write(message + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def free_cores() -> tuple[int, float]:
    """``(cores this process may run on, the 1-minute load average)`` (load 0 where the system
    does not report one)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return cores, load


_warned = False


def check_threads(threads: int | None = None, *, warn: bool = True) -> int:
    """Set torch's CPU threads to ``threads`` (``None``: keep torch's choice) and warn once
    per process when they exceed the cores that are free (the cores this process may use
    minus the load average): threads that wait for each other on a busy machine can make a
    step many times slower than one thread would. ``warn=False``: never in this process (a
    child whose parent has checked). Returns the threads in use."""
    import torch

    global _warned
    _warned = _warned or not warn
    if threads is not None:
        torch.set_num_threads(int(threads))
    used = torch.get_num_threads()
    cores, load = free_cores()
    free = max(1, cores - int(round(load)))
    if used > free and not _warned:
        _warned = True
        log.warning("%d CPU threads, but only %d of %d cores are free (load average %.1f): "
                    "on a busy machine threads wait for each other and a step can take many "
                    "times longer; pass --threads %d (or train.threads)", used, free, cores,
                    load, free)
    return used
