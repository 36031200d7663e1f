"""Glue between the configuration and the ``models`` / ``data`` layers.

Builds the model and the patch dataset a configuration describes, fills in what the data
decides (spatial dims, channels, classes), and rebuilds a model from a checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import find_checkpoint, load_weights, read_checkpoint_config
from .config import Config
from .errors import CheckpointError, ConfigError, UserError

__all__ = [
    "build_dataset",
    "build_model",
    "load_cases",
    "load_model",
    "make_validator",
    "prepare_image",
    "segment",
]

log = logging.getLogger(__name__)


def load_cases(datalist_path: str | Path):
    """Read a datalist and load its training and validation cases (all into memory).

    Returns:
        ``(datalist, training CaseData list, validation CaseData list)``.
    """
    from clstm4d.data import load_case, load_datalist

    p = Path(datalist_path)
    if not p.is_file():
        raise UserError(f"datalist not found: {p}")
    dl = load_datalist(p)
    if not dl.training:
        raise UserError(f"datalist {p} has no 'training' cases")
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
    return kw


def create(name: str, **kwargs: Any) -> torch.nn.Module:
    """``create_model`` with its argument errors turned into one-line configuration errors."""
    from clstm4d.models import create_model

    try:
        return create_model(name, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build model '{name}': {e}") from None


def build_model(cfg: Config, datalist, cases) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model ``cfg.model`` names, sized for the data, and the resolved config to save."""
    kw = _model_kwargs(cfg, datalist, cases)
    torch.manual_seed(cfg.train.seed)
    model = create(cfg.model.name, **kw)
    resolved = cfg.to_dict()
    for k in ("spatial_dims", "in_channels", "out_channels"):
        resolved["model"][k] = kw[k]
    resolved["model_config"] = dict(model.config)
    resolved["labels"] = {str(k): v for k, v in (datalist.labels or {}).items()}
    return model, resolved


def build_dataset(cfg: Config, cases, resolved: dict[str, Any]):
    """The training :class:`~clstm4d.data.PatchDataset` for ``cfg.data``."""
    from clstm4d.data import PatchDataset

    d = cfg.data
    dims = resolved["model"]["spatial_dims"]
    roi = None if d.roi is None else (d.roi * dims if len(d.roi) == 1 else d.roi)
    try:
        return PatchDataset(cases, window=d.window, roi=roi, foreground_prob=d.foreground_prob,
                            seed=cfg.train.seed, augment=d.augment, normalize=d.normalize,
                            degrade=d.degrade)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"data: {e}") from None


def prepare_image(image: np.ndarray, normalize: str | None, in_channels: int,
                  name: str = "input") -> torch.Tensor:
    """Normalise an image ``(t, c, *s)`` as in training and check its channel count."""
    from clstm4d.data import normalize_intensity

    if image.shape[1] != in_channels:
        raise UserError(
            f"{name} has {image.shape[1]} channel(s) per frame but the model expects "
            f"{in_channels} (in_channels)"
        )
    return torch.from_numpy(np.ascontiguousarray(normalize_intensity(image, normalize)))


def load_model(checkpoint: str | Path, device: torch.device | None = None
               ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model saved in ``checkpoint`` and load its weights (nothing unpickled).

    Returns:
        ``(model in eval mode, the checkpoint's resolved config)``.
    """
    ck = find_checkpoint(checkpoint)
    config = read_checkpoint_config(ck)
    mc = config.get("model_config")
    if not isinstance(mc, dict) or "name" not in mc:
        raise CheckpointError(f"checkpoint {ck} has no model_config in its config.json")
    model = create(mc["name"], **{k: v for k, v in mc.items() if k != "name"})
    load_weights(model, ck)
    if device is not None:
        model = model.to(device)
    return model.eval(), config


def segment(model: torch.nn.Module, config: dict[str, Any], image: np.ndarray, *,
            device: torch.device | None = None, amp_dtype=None, name: str = "input",
            **predict_overrides: Any) -> np.ndarray:
    """Normalise ``image (t, c, *s)`` as in training and segment it with the predict settings
    saved in ``config`` (overridden by ``predict_overrides``); returns labels ``(t, *s)``."""
    from .predict import predict_sequence

    p = {**config.get("predict", {}), **predict_overrides}
    x = prepare_image(image, config.get("data", {}).get("normalize"),
                      int(config["model"]["in_channels"]), name)
    labels = predict_sequence(model, x, roi=p.get("roi"), overlap=p.get("overlap", 0.25),
                              chunk=p.get("chunk", 16), time_margin=p.get("time_margin"),
                              sw_batch_size=p.get("sw_batch_size", 1),
                              mode=p.get("mode", "gaussian"), device=device, amp_dtype=amp_dtype)
    return labels.numpy()


def make_validator(cfg: Config, cases, resolved: dict[str, Any], device: torch.device):
    """A function ``model -> {"val_dice": mean Dice over frames and foreground classes,
    "val_dice_per_frame": [mean over validation cases of frame 0, 1, ...]}``."""
    from .metrics import dice_per_frame

    k = int(resolved["model"]["out_channels"])

    def validate(model: torch.nn.Module) -> dict[str, Any]:
        scores = []
        for c in cases:
            pred = segment(model, resolved, c.image, device=device, name=c.name)
            scores.append(dice_per_frame(pred, c.label, k).mean(1))  # (t,)
        model.train()
        longest = max(len(s) for s in scores)
        per_frame = [float(torch.stack([s[f] for s in scores if len(s) > f]).mean())
                     for f in range(longest)]
        return {"val_dice": float(torch.cat(scores).mean()), "val_dice_per_frame": per_frame}

    return validate
