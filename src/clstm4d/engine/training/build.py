"""What a training run is built from: the model and the patch dataset a configuration
describes, with what the data decides filled in (spatial dims, channels, classes).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from clstm4d._common import per_axis
from clstm4d.data import PatchDataset, ignore_index, load_case, load_datalist
from clstm4d.data.leakage import check_no_leakage
from clstm4d.engine.run.config import Config, ModelSpec, SavedRun, create
from clstm4d.errors import ConfigError, UserError

__all__ = ["build_dataset", "build_model", "load_cases", "resolve_degrade"]

log = logging.getLogger(__name__)


def load_cases(datalist_path: str | Path):
    """Read a datalist and load its training and validation cases (all into memory).

    Returns:
        ``(datalist, training CaseData list, validation CaseData list)``.
    """
    dl = load_datalist(datalist_path, require="training")
    check_no_leakage(dl)
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
    if cfg.train.recompute:
        kw["recompute"] = True
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
    return model, SavedRun(resolved, ModelSpec.of(model), dict(datalist.labels or {}))


def build_dataset(cfg: Config, cases, run: SavedRun):
    """The training :class:`~clstm4d.data.PatchDataset` for ``cfg.data``."""
    d = cfg.data
    dims = run.model_spec.spatial_dims
    roi = None if d.roi is None else per_axis("'data.roi'", d.roi, dims, error=ConfigError)
    try:
        return PatchDataset(cases, window=d.window, roi=roi, foreground_prob=d.foreground_prob,
                            seed=cfg.train.seed, augment=d.augment, normalize=d.normalize,
                            degrade=resolve_degrade(d.degrade, run.model_spec),
                            ignore_index=ignore_index(run.labels),
                            reverse_time=d.reverse_time)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"data: {e}") from None


def resolve_degrade(value: Any, spec: ModelSpec) -> Any:
    """``data.degrade`` for :class:`~clstm4d.data.PatchDataset`: ``"auto"`` is on for models
    with temporal memory (all but ``temporal="none"``), off for per-frame models."""
    if isinstance(value, str):
        if value != "auto":
            raise ConfigError(f"data.degrade must be true, false, 'auto' or a mapping of "
                              f"Degrade arguments, got {value!r}")
        return spec.options.get("temporal") != "none"
    return value


