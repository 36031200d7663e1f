"""``train(config)``: check the run folder, load the data, build the model and the patches,
check the memory, and run the loop."""

from __future__ import annotations

from pathlib import Path

from clstm4d.engine.run.config import Config
from clstm4d.engine.run.folders import RunFolder
from clstm4d.engine.run.runtime import init_distributed, reset_process_peak, return_freed_memory
from clstm4d.errors import UserError

from .build import build_dataset, build_model, load_cases
from .faults import decide_on_rank0
from .guard import check_training_memory
from .loop import TrainResult, fit
from .validate import make_validator

__all__ = ["train"]


def train(cfg: Config, *, resume: str | Path | None = None,
          progress_validation: bool = True, overwrite: bool = False,
          force: bool = False) -> TrainResult:
    """Train the model described by ``cfg`` on ``cfg.data.datalist``.

    The model's missing sizes come from the data: ``spatial_dims`` and ``out_channels``
    (number of classes, the ``"ignore"`` class left out) from the datalist, ``in_channels``
    from the first case. With ``data.spacing`` set, the training cases are resampled to that
    voxel size first. Validation (mean Dice over the annotated frames of the datalist's
    ``validation`` cases) runs on rank 0.

    The run folder (``train.out``) is checked once, before the data are loaded
    (:class:`~clstm4d.engine.run.folders.RunFolder`: what to resume from, ``overwrite``).
    Before the first step the memory model's estimate of a step is compared with what the
    device has free (:func:`~clstm4d.engine.training.guard.check_training_memory`): a run
    predicted not to fit stops with a :class:`UserError` unless ``force``.
    """
    dist_info, device = init_distributed(cfg.train.device, timeout_s=cfg.train.dist_timeout)
    if device.type == "cpu":  # freed tensors leave the resident set: the peak is what lives
        return_freed_memory()
    reset_process_peak(device)  # peak_mb: this run's, also when one process trains twice
    if cfg.data.datalist is None:
        raise UserError("no training data: set data.datalist (or --datalist)")
    folder = RunFolder(cfg.train.out, resume=resume, overwrite=overwrite)
    decide_on_rank0(folder.check, dist_info.distributed, dist_info.is_main)  # before loading
    datalist, train_cases, val_cases = load_cases(cfg.data.datalist)
    if cfg.data.spacing is not None:  # train at one voxel size (validation: the Predictor's)
        from clstm4d.data import resample_case

        train_cases = [resample_case(c, cfg.data.spacing) for c in train_cases]
    model, run = build_model(cfg, datalist, train_cases)
    dataset = build_dataset(cfg, train_cases, run)
    estimate = check_training_memory(cfg, run, train_cases, device, force=force,
                                     validation=val_cases if progress_validation else ())
    del train_cases  # the dataset holds each case once, normalised
    dataset.prepare()
    validate = None
    if val_cases and progress_validation:
        validate = make_validator(run, val_cases, device)
    return fit(model, dataset, cfg.train, batch_size=cfg.data.batch_size, folder=folder,
               saved_config=run.to_dict(), validate=validate, ignore_index=datalist.ignore_index,
               num_workers=cfg.data.num_workers, dist_info=dist_info, device=device,
               predicted_peak=estimate.total)
