"""The training loop: AdamW, Dice + cross-entropy over all frames, exact resume, DDP.

Shape legend: ``n`` batch, ``t`` frames, ``c`` channels, ``k`` classes, ``*s`` spatial axes.

:func:`fit` trains any model ``(n, t, c, *s) -> (n, t, k, *s)`` on any map-style dataset whose
items are dicts with ``image (t, c, *s)``, ``label (t, *s)`` and optionally ``length``;
:func:`train` builds model and dataset from a :class:`~clstm4d.engine.config.Config` and calls
it. The batches of step ``i`` are a pure function of ``(seed, i)``, so a run resumed from a
checkpoint sees exactly the batches the uninterrupted run would have seen, and under
``torchrun`` rank ``r`` of ``w`` takes the ``r``-th slice of the same global batch a single
process would take.

Examples:
    >>> sampler = StepBatchSampler(5, batch_size=2, steps=3)
    >>> list(sampler)
    [[0, 1], [2, 3], [4, 5]]
    >>> list(StepBatchSampler(5, 2, steps=3, start_step=2)) == list(sampler)[2:]
    True
    >>> stream = EpochStream(list("abc"), seed=0)
    >>> sorted(stream[p] for p in range(3)) == sorted(stream[p] for p in range(3, 6))
    True
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from .checkpoint import atomic_write_text, find_checkpoint, load_training_state, save_checkpoint
from .config import Config, TrainConfig
from .errors import Preempted, UserError
from .faults import NonFiniteSteps, StopOnSignal, decide_on_rank0, ignore_stop_signals
from .guards import RunFolder
from .metrics import PseudoLabelLoss, SequenceLoss
from .runtime import DistInfo, PeakMemory, amp_dtype, autocast, init_distributed

__all__ = ["EpochStream", "StepBatchSampler", "TrainResult", "fit", "param_groups", "train"]

log = logging.getLogger(__name__)


class StepBatchSampler(Sampler):
    """Batches of sample positions, step by step: step ``i`` of rank ``r`` gets positions
    ``[(i*w + r)*B, (i*w + r + 1)*B)`` of an endless stream, so the global batch of a step
    is the same for any number of ranks and for a resumed run.

    Args:
        length: unused positions are fine; kept for ``len(dataset)`` checks (must be >= 1).
        batch_size: ``B``, samples per step on this rank.
        steps: the last step (exclusive).
        seed: kept for symmetry with :class:`EpochStream` (which owns the randomness).
        start_step: the first step yielded (for resuming).
        rank, world_size: this process's slice of the global batch.
    """

    def __init__(self, length: int, batch_size: int, steps: int, seed: int = 0,
                 start_step: int = 0, rank: int = 0, world_size: int = 1):
        if length < 1:
            raise UserError("the training dataset is empty")
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.steps = batch_size, steps
        self.start_step, self.rank, self.world = start_step, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        glob = self.batch_size * self.world
        for step in range(self.start_step, self.steps):
            first = step * glob + self.rank * self.batch_size
            yield list(range(first, first + self.batch_size))

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)


class EpochStream(torch.utils.data.Dataset):
    """An endless stream over a map-style dataset: position ``p`` is item
    ``perm_e[p mod len]`` of epoch ``e = p // len``, with one random permutation per epoch
    seeded from ``(seed, e)``; datasets with ``set_epoch`` (``PatchDataset``) are told the
    epoch, so they draw new crops each epoch. A pure function of the position: works the same
    in DataLoader workers, on every rank and after a resume.
    """

    def __init__(self, dataset, seed: int = 0):
        self.dataset, self.seed = dataset, seed
        self.length = len(dataset)
        self._epoch, self._perm = -1, []

    def __len__(self) -> int:  # not used by the batch sampler; positions are unbounded
        return self.length

    def __getitem__(self, position: int):
        epoch, i = divmod(int(position), self.length)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = torch.randperm(self.length, generator=g).tolist()
            self._epoch = epoch
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
        return self.dataset[self._perm[i]]


@dataclass
class TrainResult:
    """What a training run produced."""

    checkpoint: Path | None
    steps: int
    seconds: float
    peak_memory_bytes: int
    history: list[dict[str, Any]] = field(default_factory=list)


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    warm, total = max(0, cfg.warmup_steps), max(1, cfg.steps)
    if cfg.scheduler not in ("cosine", "constant"):
        raise UserError(f"train.scheduler must be 'cosine' or 'constant', got '{cfg.scheduler}'")

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class _MetricsLog:
    """Metrics to ``metrics.jsonl`` and ``metrics.csv`` (and TensorBoard when installed)."""

    COLUMNS = ["step", "loss", "lr", "seconds", "val_dice", "skipped_steps"]

    def __init__(self, out: Path, resume_step: int):
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = out / "metrics.jsonl"
        self.csv = out / "metrics.csv"
        if resume_step > 0:  # drop lines past the checkpoint we resume from
            for path in (self.jsonl, self.csv):
                if path.exists():
                    keep = []
                    for i, line in enumerate(path.read_text().splitlines()):
                        if path == self.csv and i == 0:
                            keep.append(line)
                            continue
                        step = (json.loads(line)["step"] if path == self.jsonl
                                else int(line.split(",")[0]))
                        if step <= resume_step:
                            keep.append(line)
                    atomic_write_text(path, "".join(x + "\n" for x in keep))
        else:
            self.jsonl.write_text("")
            self.csv.write_text(",".join(self.COLUMNS) + "\n")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            pass

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


def _resume_point(run: RunFolder) -> Path | None:
    """The checkpoint to resume from (after the run folder's checks), or None."""
    resume = run.check()
    return None if resume is None else find_checkpoint(resume)


def _mean_over_ranks(value: torch.Tensor, dist_info: DistInfo) -> torch.Tensor:
    if dist_info.distributed:
        import torch.distributed as tdist

        tdist.all_reduce(value, op=tdist.ReduceOp.SUM)
        value = value / dist_info.world_size
    return value


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: ``weight_decay`` on convolution and linear weights (tensors of
    2 or more dimensions) only; none on norm weights, biases (the LSTM's forget-gate bias
    included) and peephole weights, which are all 1-D: decaying them pulls norms towards
    zero gain and the forget bias away from its initial value.

    Examples:
        >>> from clstm4d import ConvLSTM
        >>> groups = param_groups(ConvLSTM(2, 1, 4, 3, peephole=True), 1e-4)
        >>> [(g["weight_decay"], len(g["params"])) for g in groups]
        [(0.0001, 2), (0.0, 3)]
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _unlabelled_weight(cfg: TrainConfig, step: int) -> float:
    """The pseudo-label term's weight at 0-based ``step``: ``cfg.unlabelled_weight``, ramped
    up linearly over the first ``cfg.unlabelled_rampup`` fraction of the run.

    Examples:
        >>> cfg = TrainConfig(steps=100, unlabelled_weight=0.5, unlabelled_rampup=0.2)
        >>> [_unlabelled_weight(cfg, s) for s in (0, 10, 20, 99)]
        [0.0, 0.25, 0.5, 0.5]
    """
    ramp = cfg.unlabelled_rampup * cfg.steps
    return cfg.unlabelled_weight * (min(1.0, step / ramp) if ramp > 0 else 1.0)


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


def fit(
    model: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    cfg: TrainConfig,
    *,
    batch_size: int,
    config: dict[str, Any] | None = None,
    resume: str | Path | None = None,
    validate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    num_workers: int = 0,
    dist_info: DistInfo | None = None,
    device: torch.device | None = None,
    overwrite: bool = False,
    ignore_index: int | None = None,
    predicted_peak: int | None = None,
) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` optimizer steps.

    Args:
        model: ``(n, t, c, *s) -> (n, t, k, *s)`` logits; moved to ``device``.
        dataset: items ``{"image": (t, c, *s), "label": (t, *s), "length": int (optional),
            "labelled": (t,) bool (optional: the annotated frames; the loss sees only those)}``.
        cfg: optimiser, schedule, precision, logging and checkpoint settings; ``cfg.out`` is
            the run folder (``checkpoints/``, ``metrics.jsonl``, ``metrics.csv``).
        batch_size: samples per step on each process.
        config: the resolved configuration, saved beside every checkpoint.
        resume: a checkpoint (or run folder) to continue from exactly.
        validate: called on rank 0 with the bare model every ``cfg.val_every`` steps and at the
            end; returns metrics such as ``{"val_dice": 0.8}``.
        num_workers: DataLoader workers (exact resume needs a dataset that is deterministic
            per index, which ``PatchDataset`` is).
        dist_info, device: where this process runs; default: from the ``torchrun``
            environment and ``cfg.device``.
        overwrite: start again from step 0 in a ``cfg.out`` that holds a run (without it,
            such a folder is continued only with ``resume``; see
            :class:`~clstm4d.engine.guards.RunFolder`).
        ignore_index: label value of the ``"ignore"`` class (left out of the loss), or None.
        predicted_peak: the memory model's estimate of a step (bytes); after the first step
            the measured peak (above the start, plus the parameters) is logged next to it
            (``peak_mb`` and ``predicted_peak_mb`` in the metrics and ``state.json``).

    Returns:
        A :class:`TrainResult` (on ranks other than 0 ``checkpoint`` is None).

    Raises:
        Preempted: after SIGTERM/SIGINT, once the current step is done and checkpointed.
        NonFiniteError: after ``cfg.max_nonfinite_steps`` consecutive skipped steps.
        UserError: ``cfg.out`` is locked by a live process or holds other files.
    """
    if dist_info is None or device is None:
        dist_info, device = init_distributed(cfg.device, timeout_s=cfg.dist_timeout)
    if cfg.steps < 1:
        raise UserError(f"train.steps must be >= 1, got {cfg.steps}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    ckdir = out / "checkpoints"
    config = dict(config or {})
    dtype = amp_dtype(device, cfg.amp)
    model = model.to(device)
    torch.manual_seed(cfg.seed + dist_info.rank)
    net: torch.nn.Module = model
    if dist_info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loss_fn = SequenceLoss(cfg.lambda_dice, cfg.lambda_ce, ignore_index)
    pseudo_fn = (PseudoLabelLoss(cfg.unlabelled_threshold, ignore_index)
                 if cfg.unlabelled_weight > 0 else None)
    start = 0
    run = RunFolder(out, resume=resume, overwrite=overwrite)
    resume = decide_on_rank0(lambda: _resume_point(run), dist_info.distributed,
                             dist_info.is_main)
    skipped = NonFiniteSteps(cfg.max_nonfinite_steps)
    if resume is not None:
        state = load_training_state(resume, model, optimizer, scheduler, scaler)
        start = int(state["step"])
        skipped = NonFiniteSteps(cfg.max_nonfinite_steps, **state["extra"].get("nonfinite", {}))
        log.info("resumed from %s at step %d", resume, start)
        if dist_info.distributed:  # every rank continues with its own RNG stream
            torch.manual_seed(cfg.seed + dist_info.rank + 1_000_003 * start)
    sampler = StepBatchSampler(len(dataset), batch_size, cfg.steps, cfg.seed, start,
                               dist_info.rank, dist_info.world_size)
    loader = DataLoader(EpochStream(dataset, cfg.seed), batch_sampler=sampler,
                        num_workers=num_workers, worker_init_fn=ignore_stop_signals,
                        generator=torch.Generator(), persistent_workers=False)
    main = dist_info.is_main
    decide_on_rank0(run.open, dist_info.distributed, main)  # create, lock, record the folder
    mlog = _MetricsLog(out, start) if main else None
    bar = None
    if main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    history: list[dict[str, Any]] = []
    ck_path = None
    t_start = time.perf_counter()
    running, count = 0.0, 0
    memory: dict[str, float] = {}

    def save(step: int) -> Path | None:
        if not main:
            return None
        return save_checkpoint(ckdir, model, step=step, config=config, optimizer=optimizer,
                               scheduler=scheduler, scaler=scaler,
                               extra={"history": history[-1:] if history else [],
                                      "nonfinite": skipped.state(), **memory},
                               keep=cfg.keep_checkpoints)

    with PeakMemory(device) as peak, run, StopOnSignal() as stop:
        step = start
        for batch in loader:
            net.train()
            x = batch["image"].to(device, non_blocking=True)
            y = batch["label"].to(device, non_blocking=True)
            lengths, labelled = (None if batch.get(k) is None else batch[k].to(device)
                                 for k in ("length", "labelled"))
            with autocast(device, dtype):
                logits = net(x)
            loss = loss_fn(logits, y, lengths, labelled)
            if pseudo_fn is not None:
                loss = loss + _unlabelled_weight(cfg, step) * pseudo_fn(logits, y, lengths,
                                                                        labelled)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            value = _mean_over_ranks(loss.detach(), dist_info)
            finite = skipped.finite(value, _unscaled_grad_norm(model, optimizer, scaler, cfg))
            if finite:  # else skip the step, as GradScaler does on overflow
                scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            skipped.update(finite, step)
            if step == start + 1 and predicted_peak is not None:
                memory = _first_step_memory(peak, model, predicted_peak)
            if finite:
                running += float(value)
                count += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(value):.4f}")
            row: dict[str, Any] | None = None
            if step % max(1, cfg.log_every) == 0 or step == cfg.steps:
                row = {"step": step, "loss": running / count if count else None,
                       "lr": scheduler.get_last_lr()[0],
                       "seconds": round(time.perf_counter() - t_start, 3),
                       "skipped_steps": skipped.total}
                running, count = 0.0, 0
            if validate is not None and main and (
                (cfg.val_every and step % cfg.val_every == 0) or step == cfg.steps
            ):
                row = row or {"step": step, "seconds": round(time.perf_counter() - t_start, 3)}
                row.update(validate(model))
            if memory and step == start + 1:
                row = {**(row or {"step": step}), **memory}
            if row is not None:
                history.append(row)
                if mlog is not None:
                    mlog.write(row)
                if bar is not None and "val_dice" in row:
                    bar.write(f"step {step}: validation Dice {row['val_dice']:.4f}")
                log.info("step %d: %s", step, row)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps \
                    and not skipped.consecutive:
                ck_path = save(step)
            if dist_info.distributed and validate is not None and cfg.val_every and \
                    step % cfg.val_every == 0:
                import torch.distributed as tdist

                tdist.barrier()
            skipped.check(step, ck_path)
            if step < cfg.steps and stop.requested(dist_info.distributed, device):
                raise Preempted(stop.received, step, save(step))
        seconds = time.perf_counter() - t_start
        ck_path = save(step)
    if bar is not None:
        bar.close()
    if mlog is not None:
        mlog.close()
    if dist_info.distributed:
        import torch.distributed as tdist

        tdist.barrier()
    return TrainResult(ck_path, step, seconds, int(peak.peak_bytes), history)


def _first_step_memory(peak: PeakMemory, model: torch.nn.Module, predicted: int
                       ) -> dict[str, float]:
    from .plan import first_step_memory

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    memory = first_step_memory(peak.so_far() + params, predicted)
    log.info("first step: peak memory %.0f MiB, predicted %.0f MiB", memory["peak_mb"],
             memory["predicted_peak_mb"])
    return memory


def train(cfg: Config, *, resume: str | Path | None = None,
          progress_validation: bool = True, overwrite: bool = False,
          force: bool = False) -> TrainResult:
    """Train the model described by ``cfg`` on ``cfg.data.datalist``.

    The model's missing sizes come from the data: ``spatial_dims`` and ``out_channels``
    (number of classes, the ``"ignore"`` class left out) from the datalist, ``in_channels``
    from the first case. With ``data.spacing`` set, the training cases are resampled to that
    voxel size first. Validation (mean Dice over the annotated frames of the datalist's
    ``validation`` cases) runs on rank 0.

    Before the first step the memory model's estimate of a step is compared with what the
    device has free (:func:`~clstm4d.engine.plan.check_training_memory`): a run predicted not
    to fit stops with a :class:`UserError` unless ``force``.
    """
    from .builders import build_dataset, build_model, load_cases, make_validator

    dist_info, device = init_distributed(cfg.train.device, timeout_s=cfg.train.dist_timeout)
    if cfg.data.datalist is None:
        raise UserError("no training data: set data.datalist (or --datalist)")
    decide_on_rank0(RunFolder(cfg.train.out, resume=resume, overwrite=overwrite).check,
                    dist_info.distributed, dist_info.is_main)  # before the (slow) loading
    datalist, train_cases, val_cases = load_cases(cfg.data.datalist)
    if cfg.data.spacing is not None:  # train at one voxel size (validation: the Predictor's)
        from clstm4d.data import resample_case

        train_cases = [resample_case(c, cfg.data.spacing) for c in train_cases]
    model, run = build_model(cfg, datalist, train_cases)
    dataset = build_dataset(cfg, train_cases, run)
    from .plan import check_training_memory

    estimate = check_training_memory(cfg, run, train_cases, device, force=force)
    validate = None
    if val_cases and progress_validation:
        validate = make_validator(run, val_cases, device)
    return fit(model, dataset, cfg.train, batch_size=cfg.data.batch_size, config=run.to_dict(),
               resume=resume, validate=validate, num_workers=cfg.data.num_workers,
               dist_info=dist_info, device=device, overwrite=overwrite,
               ignore_index=datalist.ignore_index, predicted_peak=estimate.total)
