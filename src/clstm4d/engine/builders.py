"""Glue between the configuration and the ``models`` / ``data`` layers.

Builds the model and the patch dataset a configuration describes, fills in what the data
decides (spatial dims, channels, classes), and rebuilds a model from a checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import find_checkpoint, load_weights, read_checkpoint_config
from .config import Config, SavedRun
from .errors import CheckpointError, ConfigError, UserError

__all__ = [
    "build_dataset",
    "build_model",
    "load_cases",
    "training_datalist",
    "load_model",
    "make_validator",
    "resolve_degrade",
]

log = logging.getLogger(__name__)


def training_datalist(datalist_path: str | Path):
    """Parse a datalist that must have training cases (:class:`UserError` when the file is
    missing or has none); nothing is loaded yet."""
    from clstm4d.data import load_datalist

    p = Path(datalist_path)
    if not p.is_file():
        raise UserError(f"datalist not found: {p}")
    dl = load_datalist(p)
    if not dl.training:
        raise UserError(f"datalist {p} has no 'training' cases")
    return dl


def load_cases(datalist_path: str | Path):
    """Read a datalist and load its training and validation cases (all into memory).

    Returns:
        ``(datalist, training CaseData list, validation CaseData list)``.
    """
    from clstm4d.data import load_case

    dl = training_datalist(datalist_path)
    train = [load_case(c) for c in dl.training]
    val = [load_case(c) for c in dl.validation]
    return dl, train, val


def _model_kwargs(cfg: Config, datalist, cases) -> dict[str, Any]:
    kw = cfg.model.kwargs()
    first = cases[0]
    dims = first.image.ndim - 2
    kw.setdefault("spatial_dims", datalist.spatial_dims or dims)
    kw.setdefault("in_channels", int(first.image.shape[1]))
    if "out_channels" not in kw:
        k = datalist.num_classes
        if not k:
            k = int(max(int(c.label.max()) for c in cases if c.label is not None)) + 1
        kw["out_channels"] = max(2, k)
    if cfg.train.activation_checkpointing:
        kw["checkpoint"] = True
    if int(first.image.shape[1]) != kw["in_channels"]:
        raise UserError(
            f"case '{first.name}' has {first.image.shape[1]} channels per frame but "
            f"model.in_channels is {kw['in_channels']}"
        )
    if kw["spatial_dims"] != dims:
        raise ConfigError(f"'model.spatial_dims' is {kw['spatial_dims']} but case "
                          f"'{first.name}' has {dims} spatial axes")
    top = _top_class(cases, datalist.ignore_index)
    if top is not None and top >= kw["out_channels"]:
        raise ConfigError(f"'model.out_channels' is {kw['out_channels']} but the labels go up "
                          f"to {top} (classes 0..{top})")
    return kw


def _top_class(cases, ignore: int | None) -> int | None:
    """The highest label value of ``cases`` other than the ``ignore`` class (None: no labels)."""
    tops = []
    for c in cases:
        if c.label is not None:
            lab = c.label if ignore is None else c.label[c.label != ignore]
            if lab.size:
                tops.append(int(lab.max()))
    return max(tops, default=None)


def create(name: str, **kwargs: Any) -> torch.nn.Module:
    """``create_model`` with its argument errors turned into one-line configuration errors."""
    from clstm4d.models import create_model

    try:
        return create_model(name, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build model '{name}': {e}") from None


def build_model(cfg: Config, datalist, cases) -> tuple[torch.nn.Module, SavedRun]:
    """The model ``cfg.model`` names, sized for the data, and the resolved run to save."""
    kw = _model_kwargs(cfg, datalist, cases)
    torch.manual_seed(cfg.train.seed)
    model = create(cfg.model.name, **kw)
    frames = getattr(model, "frames", None)  # a model built for windows of fixed length
    if frames is not None and cfg.data.window != frames:
        raise ConfigError(f"'data.window' is {cfg.data.window} but model '{cfg.model.name}' "
                          f"takes windows of exactly {frames} frames (model.extra.frames)")
    resolved = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, **{k: kw[k] for k in
                                                     ("spatial_dims", "in_channels",
                                                      "out_channels")}))
    return model, SavedRun(resolved, dict(model.config), dict(datalist.labels or {}))


def build_dataset(cfg: Config, cases, run: SavedRun):
    """The training :class:`~clstm4d.data.PatchDataset` for ``cfg.data``."""
    from clstm4d.data import PatchDataset, ignore_index

    d = cfg.data
    dims = run.config.model.spatial_dims
    roi = None if d.roi is None else (d.roi * dims if len(d.roi) == 1 else d.roi)
    if roi is not None and len(roi) != dims:
        raise ConfigError(f"'data.roi' must have 1 or {dims} values (spatial axes), got {d.roi}")
    try:
        return PatchDataset(cases, window=d.window, roi=roi, foreground_prob=d.foreground_prob,
                            seed=cfg.train.seed, augment=d.augment, normalize=d.normalize,
                            degrade=resolve_degrade(d.degrade, run.model_config),
                            ignore_index=ignore_index(run.labels))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"data: {e}") from None


def resolve_degrade(value: Any, model_config: dict[str, Any]) -> Any:
    """``data.degrade`` for :class:`~clstm4d.data.PatchDataset`: ``"auto"`` is on for models
    with temporal memory (all but ``temporal="none"``), off for per-frame models."""
    if isinstance(value, str):
        if value != "auto":
            raise ConfigError(f"data.degrade must be true, false, 'auto' or a mapping of "
                              f"Degrade arguments, got {value!r}")
        return model_config.get("temporal") != "none"
    return value


def load_model(checkpoint: str | Path, device: torch.device | None = None
               ) -> tuple[torch.nn.Module, SavedRun]:
    """Rebuild the model saved in ``checkpoint`` and load its weights (nothing unpickled).

    Returns:
        ``(model in eval mode, the checkpoint's typed configuration)``.
    """
    ck = find_checkpoint(checkpoint)
    try:
        run = SavedRun.from_dict(read_checkpoint_config(ck), source=f"checkpoint {ck}")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    mc = run.model_config
    model = create(mc["name"], **{k: v for k, v in mc.items() if k != "name"})
    load_weights(model, ck)
    if device is not None:
        model = model.to(device)
    return model.eval(), run


def make_validator(run: SavedRun, cases, device: torch.device):
    """A function ``model -> {"val_dice": mean Dice over the annotated frames and foreground
    classes, "val_dice_per_frame": [mean over the validation cases annotated there, of frame
    0, 1, ...; None where none is]}``; voxels of the ``"ignore"`` class are left out. Predicts
    every frame with a :class:`~clstm4d.engine.predictor.Predictor` (full precision) and
    leaves the model in training mode."""
    from clstm4d.data import ignore_index

    from .metrics import dice_per_frame
    from .predictor import Predictor

    k = run.config.model.out_channels
    ignore = ignore_index(run.labels)

    def validate(model: torch.nn.Module) -> dict[str, Any]:
        predictor = Predictor(model, run, device=device, amp="none")
        scores: list[dict[int, float]] = []  # per case: annotated frame -> Dice
        for c in cases:
            pred = predictor.predict_array(c.image, c.geometry, name=c.name)
            annotated = np.flatnonzero(c.labelled)
            dice = dice_per_frame(pred[annotated], c.label[annotated], k, ignore).mean(1)
            scores.append(dict(zip(annotated.tolist(), dice.tolist(), strict=True)))
        model.train()
        longest = max(len(c.labelled) for c in cases)
        per_frame = [[s[f] for s in scores if f in s] for f in range(longest)]
        return {"val_dice": float(np.mean([v for s in scores for v in s.values()])),
                "val_dice_per_frame": [float(np.mean(v)) if v else None for v in per_frame]}

    return validate
