"""Faults during training, as small pieces the loop in :mod:`~clstm4d.engine.training.loop` uses.

- :class:`StopOnSignal`: SIGTERM (a cluster preempting the job) or SIGINT (Ctrl-C) sets a flag;
  the loop finishes its step, writes a checkpoint and raises
  :class:`~clstm4d.errors.Preempted`. Under ``torchrun`` the ranks agree through a
  collective (max of the flags), so every rank stops after the same step even when only one
  of them got the signal. A second SIGINT interrupts at once; a repeated SIGTERM (torchrun
  forwards the one the cluster sent to every process) does not.
- :class:`NonFiniteSteps`: a step whose loss or gradient norm is not finite is skipped (the
  optimizer does not step, as AMP's ``GradScaler`` does on overflow); skips are counted, and
  ``limit`` consecutive ones stop the run with
  :class:`~clstm4d.errors.NonFiniteError`.
- :func:`decide_on_rank0`: a check that only rank 0 may make (it looks at files rank 0 is
  about to write), with its result or its error given to every rank, so that no rank goes on
  alone and waits forever for the others.

Examples:
    >>> steps = NonFiniteSteps(limit=2)
    >>> steps.update(finite=False, step=1); steps.update(finite=True, step=2)
    >>> steps.total, steps.consecutive
    (1, 0)
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

import torch

from clstm4d.errors import NonFiniteError, UserError

__all__ = ["NonFiniteSteps", "StopOnSignal", "decide_on_rank0", "ignore_stop_signals"]

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGTERM/SIGINT (a cluster signals every
    process of the job), so they keep serving the step the main process is finishing."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class StopOnSignal:
    """Turn SIGTERM/SIGINT into a request to stop after the current step (a context manager;
    handlers are installed in the main thread only and restored on exit).

    Attributes:
        received: the name of the first signal received, or None.
    """

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            if signum == signal.SIGINT:  # Ctrl-C twice: the user wants out now
                raise KeyboardInterrupt(f"second signal ({name})")
            log.warning("%s received again: still finishing the step", name)
            return  # a repeated SIGTERM (torchrun forwards the cluster's): keep checkpointing
        self.received = name
        log.warning("%s received: finishing this step, then writing a checkpoint%s", name,
                    " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")

    def requested(self, distributed: bool = False, device: torch.device | None = None) -> bool:
        """Whether to stop now; under DDP a collective, so call it on every rank each step."""
        flag = self.received is not None
        if distributed:
            import torch.distributed as dist

            t = torch.tensor([float(flag)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item() > 0)
        return flag

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


class NonFiniteSteps:
    """Counts skipped (non-finite) steps; stops the run after ``limit`` consecutive ones.

    Args:
        limit: consecutive non-finite steps that stop the run (0: never stop).
        total, consecutive: the counts so far (restored from a checkpoint).
    """

    def __init__(self, limit: int, total: int = 0, consecutive: int = 0):
        self.limit, self.total, self.consecutive = int(limit), int(total), int(consecutive)

    @staticmethod
    def finite(loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """True when both the loss and the gradient norm are finite (one host sync)."""
        return bool(torch.isfinite(torch.stack([loss.float(), grad_norm.float().to(loss.device)]))
                    .all())

    def update(self, finite: bool, step: int) -> None:
        """Record step ``step`` (1-based, the step just done) as finite or skipped."""
        if finite:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        log.warning("step %d skipped: non-finite loss or gradient (%d in a row, %d in total)",
                    step, self.consecutive, self.total)

    def check(self, step: int, last_checkpoint: Any = None) -> None:
        """Raise :class:`NonFiniteError` once ``limit`` consecutive steps were skipped."""
        if not self.limit or self.consecutive < self.limit:
            return
        kept = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint is not None
                else "no checkpoint was written")
        raise NonFiniteError(
            f"training stopped after step {step}: the loss or the gradients were not finite in "
            f"{self.consecutive} consecutive steps, {step - self.consecutive + 1} to {step} "
            f"(skipped: they did not change the weights); {kept}. Lower train.lr, set "
            "train.grad_clip, check the data for NaN, or raise train.max_nonfinite_steps"
        )

    def state(self) -> dict[str, int]:
        return {"total": self.total, "consecutive": self.consecutive}


def decide_on_rank0(fn: Callable[[], Any], distributed: bool, is_main: bool) -> Any:
    """Run ``fn`` on rank 0 only and give its result to every rank; a :class:`UserError` it
    raises is raised on every rank (with the same message)."""
    result, error = None, None
    if is_main:
        try:
            result = fn()
        except UserError as e:
            error = e
    if distributed:
        import torch.distributed as dist

        box = [result, None if error is None else (type(error), str(error))]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
        if box[1] is not None and error is None:
            cls, message = box[1]
            error = cls(message) if issubclass(cls, UserError) else UserError(message)
    if error is not None:
        raise error
    return result
