"""Named model presets: ``create_model(name, **overrides)`` and ``list_models()``."""

from __future__ import annotations

from typing import Any

from torch import nn

from clstm4d.models.tac import TimeAsChannelsUNet
from clstm4d.models.unet import TimeResolvedUNet

__all__ = ["create_model", "list_models"]

_DEFAULTS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2}

# name -> (class, keyword arguments on top of _DEFAULTS)
_PRESETS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    # the classes with their own defaults
    "unet": (TimeResolvedUNet, {}),
    "tac": (TimeAsChannelsUNet, {"frames": 8}),
    # trains on a 2-core CPU in minutes (2D 64^2 x 8 frames, 3D 32^3 x 8 frames)
    "tiny": (TimeResolvedUNet, {"channels": (8, 16, 32)}),
    "small": (TimeResolvedUNet, {"channels": (16, 32, 64, 128)}),
    # the widths and recurrence of the reference design (3D, ConvLSTM k=3 at the bottleneck)
    "reference": (TimeResolvedUNet, {"channels": (64, 128, 256, 512), "temporal": "bottleneck",
                                     "cell": "lstm", "rnn_kernel_size": 3}),
    "tac-tiny": (TimeAsChannelsUNet, {"channels": (8, 16, 32), "frames": 8}),
    "tac-small": (TimeAsChannelsUNet, {"channels": (16, 32, 64, 128), "frames": 8}),
}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted.

    Examples:
        >>> list_models()
        ['reference', 'small', 'tac', 'tac-small', 'tac-tiny', 'tiny', 'unet']
    """
    return sorted(_PRESETS)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build the preset ``name`` with keyword ``overrides``.

    Defaults for every preset: ``spatial_dims=3, in_channels=1, out_channels=2``. The model's
    ``config`` holds ``name`` and every keyword argument, so
    ``create_model(**model.config)``-style rebuilding works:
    ``create_model(cfg["name"], **{k: v for k, v in cfg.items() if k != "name"})``.

    Args:
        name: one of :func:`list_models`.
        overrides: keyword arguments of :class:`TimeResolvedUNet` or
            :class:`TimeAsChannelsUNet` (``frames`` for the latter).

    Examples:
        >>> net = create_model("tiny", spatial_dims=2, in_channels=1, out_channels=3,
        ...                    temporal="none")
        >>> net.config["name"], net.config["channels"], net.streamable
        ('tiny', [8, 16, 32], True)
        >>> same = create_model(**net.config)
        >>> same.config == net.config
        True
    """
    if name not in _PRESETS:
        raise ValueError(f"create_model: unknown model name {name!r}; choose one of "
                         f"{list_models()}")
    cls, preset = _PRESETS[name]
    kwargs = {**_DEFAULTS, **preset, **overrides}
    if isinstance(kwargs.get("channels"), list):  # from a JSON/YAML config
        kwargs["channels"] = tuple(kwargs["channels"])
    try:
        model = cls(**kwargs)
    except TypeError as err:  # an unknown keyword: say which ones exist
        import inspect

        known = [p for p in inspect.signature(cls).parameters]
        raise TypeError(f"create_model({name!r}): {err}; {cls.__name__} takes {known}") from err
    model.config["name"] = name
    return model
