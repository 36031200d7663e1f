"""The training loop: AdamW, Dice + cross-entropy over the annotated frames, exact resume, DDP.

Shape legend: ``n`` batch, ``t`` frames, ``c`` channels, ``k`` classes, ``*s`` spatial axes.

:func:`fit` trains any model ``(n, t, c, *s) -> (n, t, k, *s)`` on any map-style dataset whose
items are dicts with ``image (t, c, *s)``, ``label (t, *s)`` and optionally ``length`` and
``labelled``. It reads top to bottom as :class:`_Loop`'s pieces: ``setup`` (optimizer,
schedule, resume, data), then per step ``step`` (forward, backward, skip a non-finite step),
``log`` (metrics rows, validation) and ``save`` (checkpoints), until the last step or a stop
signal. Which samples a step takes is a pure function of ``(seed, step)``
(:mod:`~clstm4d.engine.training.sampling`), so a resumed run continues bitwise.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from clstm4d._common import atomic_write_text
from clstm4d.engine.run.checkpoint import save_checkpoint
from clstm4d.engine.run.config import TrainConfig
from clstm4d.engine.run.folders import RunFolder
from clstm4d.engine.run.progress import Progress, check_threads
from clstm4d.engine.run.runtime import (
    DistInfo,
    PeakMemory,
    amp_dtype,
    autocast,
    init_distributed,
    process_memory,
)
from clstm4d.errors import Preempted, UserError

from .faults import NonFiniteSteps, StopOnSignal, decide_on_rank0, ignore_stop_signals
from .guard import first_step_memory
from .losses import PseudoLabelLoss, SequenceLoss, unlabelled_weight
from .optim import lr_lambda, param_groups
from .sampling import EpochStream, StepBatchSampler
from .tbptt import check_tbptt, chunked_backward

__all__ = ["TrainResult", "fit"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training run produced."""

    checkpoint: Path | None
    steps: int
    seconds: float
    peak_memory_bytes: int
    history: list[dict[str, Any]] = field(default_factory=list)


class _MetricsLog:
    """Metrics to the run folder's ``metrics.jsonl`` and ``metrics.csv`` (and TensorBoard when
    installed)."""

    COLUMNS = ["step", "loss", "lr", "seconds", "val_dice", "skipped_steps"]

    def __init__(self, folder: RunFolder, resume_step: int):
        folder.path.mkdir(parents=True, exist_ok=True)
        self.jsonl, self.csv = folder.metrics_jsonl, folder.metrics_csv
        if resume_step > 0:  # drop lines past the checkpoint we resume from
            for path in (self.jsonl, self.csv):
                if path.exists():
                    self._truncate(path, resume_step)
        else:
            self.jsonl.write_text("")
            self.csv.write_text(",".join(self.COLUMNS) + "\n")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(folder.tensorboard))
        except ImportError:
            pass

    def _truncate(self, path: Path, resume_step: int) -> None:
        keep = []
        for i, line in enumerate(path.read_text().splitlines()):
            if path == self.csv and i == 0:
                keep.append(line)
                continue
            step = json.loads(line)["step"] if path == self.jsonl else int(line.split(",")[0])
            if step <= resume_step:
                keep.append(line)
        atomic_write_text(path, "".join(x + "\n" for x in keep))

    def write(self, row: dict[str, Any]) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv, "a", newline="") as f:
            csv.writer(f).writerow([row.get(c, "") for c in self.COLUMNS])
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _mean_over_ranks(value: torch.Tensor, dist_info: DistInfo) -> torch.Tensor:
    if dist_info.distributed:
        import torch.distributed as tdist

        tdist.all_reduce(value, op=tdist.ReduceOp.SUM)
        value = value / dist_info.world_size
    return value


def _barrier(dist_info: DistInfo) -> None:
    if dist_info.distributed:
        import torch.distributed as tdist

        tdist.barrier()


def _unscaled_grad_norm(model: torch.nn.Module, optimizer, scaler, cfg: TrainConfig
                        ) -> torch.Tensor:
    """Unscale (fp16), clip to ``cfg.grad_clip`` if set, and return the total gradient norm
    (the same on every rank: DDP has averaged the gradients)."""
    scaler.unscale_(optimizer)
    if cfg.grad_clip:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


class _Loop:
    """One run of :func:`fit`: the state the pieces share, and the pieces."""

    def __init__(self, model, dataset, cfg: TrainConfig, *, batch_size: int, folder: RunFolder,
                 saved_config: dict[str, Any], validate, ignore_index: int | None,
                 num_workers: int, dist_info: DistInfo, device: torch.device,
                 predicted_peak: int | None):
        self.model, self.dataset, self.cfg = model, dataset, cfg
        self.batch_size, self.folder, self.saved_config = batch_size, folder, saved_config
        self.validate, self.ignore_index, self.num_workers = validate, ignore_index, num_workers
        self.dist, self.device, self.predicted_peak = dist_info, device, predicted_peak
        self.main = dist_info.is_main
        self.history: list[dict[str, Any]] = []
        self.memory: dict[str, float] = {}
        self.running, self.count = 0.0, 0
        self.ck_path: Path | None = None
        self.bar = self.mlog = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Optimizer, schedule, losses, the resume point, the data loader, the run folder."""
        cfg, model = self.cfg, self.model
        self.dtype = amp_dtype(self.device, cfg.amp)
        model.to(self.device)
        torch.manual_seed(cfg.seed + self.dist.rank)
        self.net = model
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(model, device_ids=ids)
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.loss_fn = SequenceLoss(cfg.lambda_dice, cfg.lambda_ce, self.ignore_index)
        self.pseudo_fn = (PseudoLabelLoss(cfg.unlabelled_threshold, self.ignore_index)
                          if cfg.unlabelled_weight > 0 else None)
        self.start = self._resume()
        sampler = StepBatchSampler(len(self.dataset), self.batch_size, cfg.steps, cfg.seed,
                                   self.start, self.dist.rank, self.dist.world_size)
        self.loader = DataLoader(EpochStream(self.dataset, cfg.seed), batch_sampler=sampler,
                                 num_workers=self.num_workers,
                                 worker_init_fn=ignore_stop_signals,
                                 generator=torch.Generator(), persistent_workers=False)
        decide_on_rank0(self.folder.open, self.dist.distributed, self.main)
        if self.main:
            self.mlog = _MetricsLog(self.folder, self.start)
            self.bar = Progress(cfg.steps, desc="train", initial=self.start,
                                enabled=cfg.progress)

    def _resume(self) -> int:
        """Restore from the run folder's resume point (checked once); the first step to run."""
        checkpoint = decide_on_rank0(self.folder.check, self.dist.distributed, self.main)
        self.skipped = NonFiniteSteps(self.cfg.max_nonfinite_steps)
        self.seconds_before = 0.0  # training time of the run before this process
        if checkpoint is None:
            return 0
        checkpoint.restore(self.model, self.optimizer, self.scheduler, self.scaler)
        start = checkpoint.step
        extra = checkpoint.state["extra"]
        last = (extra.get("history") or [{}])[-1]
        self.seconds_before = float(extra.get("seconds", last.get("seconds") or 0.0))
        counts = extra.get("nonfinite", {})
        self.skipped = NonFiniteSteps(self.cfg.max_nonfinite_steps, **counts)
        log.info("resumed from %s at step %d", checkpoint.path, start)
        if self.dist.distributed:  # every rank continues with its own RNG stream
            torch.manual_seed(self.cfg.seed + self.dist.rank + 1_000_003 * start)
        return start

    # ------------------------------------------------------------------ one step
    def step(self, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, bool]:
        """Forward, loss, backward and (when finite) the optimizer step for 0-based ``step``;
        returns the loss averaged over ranks and whether the step was taken."""
        cfg, dev = self.cfg, self.device
        self.net.train()
        x = batch["image"].to(dev, non_blocking=True)
        y = batch["label"].to(dev, non_blocking=True)
        lengths, labelled = (None if batch.get(k) is None else batch[k].to(dev)
                             for k in ("length", "labelled"))
        self.optimizer.zero_grad(set_to_none=True)
        value = _mean_over_ranks(self._backward(x, y, lengths, labelled, step), self.dist)
        norm = _unscaled_grad_norm(self.model, self.optimizer, self.scaler, cfg)
        finite = self.skipped.finite(value, norm)
        if finite:  # else skip the step, as GradScaler does on overflow
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return value, finite

    def _backward(self, x, y, lengths, labelled, step: int) -> torch.Tensor:
        """Forward and backward of one window (in chunks with ``cfg.tbptt``); the loss."""
        cfg, dev = self.cfg, self.device
        weight = unlabelled_weight(cfg, step)
        extra = None if self.pseudo_fn is None else (
            lambda logits, *rest: weight * self.pseudo_fn(logits, *rest))
        if cfg.tbptt is not None:
            def forward(run):
                with autocast(dev, self.dtype):
                    return run()

            return chunked_backward(self.net, self.loss_fn, x, y, lengths, labelled,
                                    chunk=cfg.tbptt, forward=forward, extra=extra,
                                    backward=lambda loss: self.scaler.scale(loss).backward())
        with autocast(dev, self.dtype):
            logits = self.net(x)
        loss = self.loss_fn(logits, y, lengths, labelled)
        if extra is not None:
            loss = loss + extra(logits, y, lengths, labelled)
        self.scaler.scale(loss).backward()
        return loss.detach()

    # ------------------------------------------------------------------ logging
    def log(self, step: int, value: torch.Tensor, finite: bool, seconds: float) -> None:
        """Record step ``step`` (1-based, just done): the running loss, the first step's
        memory; a metrics row every ``log_every`` steps, when validation is due and after the
        first step (its memory), each row complete (loss since the last row, learning rate,
        seconds of training since step 0 across resumes, skipped steps)."""
        cfg = self.cfg
        if step == self.start + 1 and self.predicted_peak is not None:
            self.memory = self._process_memory("first step")
        if finite:
            self.running += float(value)
            self.count += 1
        if self.bar is not None:
            self.bar.update(1, loss=f"{float(value):.4f}")
        extra: dict[str, Any] = {}
        if self.validate is not None and self.main and (
                (cfg.val_every and step % cfg.val_every == 0) or step == cfg.steps):
            extra.update(self.validate(self.model))
        if self.memory and step == cfg.steps:  # the whole run's peak, validation included
            self.memory = self._process_memory("run")
        if self.memory and step in (self.start + 1, cfg.steps):
            extra.update(self.memory)
        if extra or step % max(1, cfg.log_every) == 0 or step == cfg.steps:
            row = {"step": step, "loss": self.running / self.count if self.count else None,
                   "lr": self.scheduler.get_last_lr()[0], "seconds": round(seconds, 3),
                   "skipped_steps": self.skipped.total, **extra}
            self.running, self.count = 0.0, 0
            self._write(row)

    def _write(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if self.mlog is not None:
            self.mlog.write(row)
        if self.bar is not None and "val_dice" in row:
            self.bar.write(f"train: step {row['step']}, validation Dice {row['val_dice']:.4f}")
        log.info("step %d: %s", row["step"], row)

    def _process_memory(self, when: str) -> dict[str, float]:
        """The process's peak memory so far (``process_memory``) next to the prediction."""
        memory = first_step_memory(process_memory(self.device), self.predicted_peak)
        log.info("%s: peak memory of the process %.0f MiB, predicted %.0f MiB", when,
                 memory["peak_mb"], memory["predicted_peak_mb"])
        return memory

    # ------------------------------------------------------------------ checkpoints
    def save(self, step: int) -> Path | None:
        """A checkpoint of step ``step`` (rank 0 only; the other ranks get None)."""
        if not self.main:
            return None
        extra = {"history": self.history[-1:], "nonfinite": self.skipped.state(),
                 "seconds": round(self.elapsed(), 3), **self.memory}
        return save_checkpoint(self.folder.checkpoints, self.model, step=step,
                               config=self.saved_config, optimizer=self.optimizer,
                               scheduler=self.scheduler, scaler=self.scaler, extra=extra,
                               keep=self.cfg.keep_checkpoints)

    def after_step(self, step: int, stop: StopOnSignal) -> None:
        """Periodic checkpoint, the ranks meeting after validation, the non-finite limit and
        a stop signal (checkpoint, then :class:`Preempted`)."""
        cfg = self.cfg
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps \
                and not self.skipped.consecutive:
            self.ck_path = self.save(step)
        if self.validate is not None and cfg.val_every and step % cfg.val_every == 0:
            _barrier(self.dist)
        self.skipped.check(step, self.ck_path)
        if step < cfg.steps and stop.requested(self.dist.distributed, self.device):
            raise Preempted(stop.received, step, self.save(step))

    # ------------------------------------------------------------------ the run
    def elapsed(self) -> float:
        """Seconds of training since step 0, over every process that continued the run."""
        return self.seconds_before + time.perf_counter() - self.t_start

    def run(self) -> TrainResult:
        self.setup()
        self.t_start = time.perf_counter()
        try:
            with PeakMemory(self.device) as self.peak, self.folder, StopOnSignal() as stop:
                step = self.start
                for batch in self.loader:
                    value, finite = self.step(batch, step)
                    step += 1
                    self.skipped.update(finite, step)
                    self.log(step, value, finite, self.elapsed())
                    self.after_step(step, stop)
                seconds = time.perf_counter() - self.t_start
                self.ck_path = self.save(step)
        finally:  # also when stopped: no bar redraws after the caller's last message
            if self.bar is not None:
                self.bar.close()
            if self.mlog is not None:
                self.mlog.close()
        _barrier(self.dist)
        return TrainResult(self.ck_path, step, seconds, int(self.peak.peak_bytes), self.history)


def fit(
    model: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    cfg: TrainConfig,
    *,
    batch_size: int,
    folder: RunFolder | None = None,
    saved_config: dict[str, Any] | None = None,
    validate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    ignore_index: int | None = None,
    num_workers: int = 0,
    dist_info: DistInfo | None = None,
    device: torch.device | None = None,
    predicted_peak: int | None = None,
) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` optimizer steps.

    Args:
        model: ``(n, t, c, *s) -> (n, t, k, *s)`` logits; moved to ``device``.
        dataset: items ``{"image": (t, c, *s), "label": (t, *s), "length": int (optional),
            "labelled": (t,) bool (optional: the annotated frames; the loss sees only those)}``.
        cfg: optimiser, schedule, precision, logging and checkpoint settings.
        batch_size: samples per step on each process.
        folder: the run folder (:class:`~clstm4d.engine.run.folders.RunFolder`: checkpoints,
            metrics, lock; what to resume from, and whether to start again with
            ``overwrite``); default ``RunFolder(cfg.out)``, which refuses a folder that holds
            a run.
        saved_config: the resolved configuration, saved beside every checkpoint.
        validate: called on rank 0 with the bare model every ``cfg.val_every`` steps and at the
            end; returns metrics such as ``{"val_dice": 0.8}``.
        ignore_index: label value of the ``"ignore"`` class (left out of the loss), or None.
        num_workers: DataLoader workers (exact resume needs a dataset that is deterministic
            per index, which ``PatchDataset`` is).
        dist_info, device: where this process runs; default: from the ``torchrun``
            environment and ``cfg.device``.
        predicted_peak: the process model's estimate of the run's peak (bytes); after the
            first and after the last step (its validation included) the process's measured
            peak (:func:`~clstm4d.engine.run.runtime.process_memory`: CPU peak resident set,
            CUDA peak reserved plus context) is logged next to it (``peak_mb`` and
            ``predicted_peak_mb`` in the metrics and ``state.json``).

    Returns:
        A :class:`TrainResult` (on ranks other than 0 ``checkpoint`` is None).

    Raises:
        Preempted: after SIGTERM/SIGINT, once the current step is done and checkpointed.
        NonFiniteError: after ``cfg.max_nonfinite_steps`` consecutive skipped steps.
        UserError: the run folder is locked by a live process or holds other files.
    """
    if dist_info is None or device is None:
        dist_info, device = init_distributed(cfg.device, timeout_s=cfg.dist_timeout)
    if cfg.steps < 1:
        raise UserError(f"train.steps must be >= 1, got {cfg.steps}")
    check_tbptt(model, cfg.tbptt)
    check_threads(cfg.threads)
    loop = _Loop(model, dataset, cfg, batch_size=batch_size,
                 folder=folder if folder is not None else RunFolder(cfg.out),
                 saved_config=dict(saved_config or {}), validate=validate,
                 ignore_index=ignore_index, num_workers=num_workers, dist_info=dist_info,
                 device=device, predicted_peak=predicted_peak)
    return loop.run()
