"""Configuration: YAML file -> dataclasses -> keyword arguments, with command-line overrides.

A configuration has four sections, each a dataclass: ``model`` (what
:func:`clstm4d.models.create_model` builds), ``data`` (what the training patches look like),
``train`` (optimiser, schedule, precision, checkpoints) and ``predict`` (sliding windows over
space, chunks over time). Unknown keys are errors, never silently ignored.

Examples:
    >>> cfg = Config.from_dict({"train": {"steps": 10}}, overrides=["model.temporal=none"])
    >>> cfg.train.steps, cfg.model.temporal
    (10, 'none')
    >>> try:
    ...     Config.from_dict({"train": {"stpes": 10}})
    ... except ConfigError as e:
    ...     print(e)  # doctest: +ELLIPSIS
    unknown key 'train.stpes' (known keys in 'train': out, steps, ...)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clstm4d.errors import ConfigError

__all__ = ["Config", "DataConfig", "ModelConfig", "ModelSpec", "PredictConfig", "SavedRun",
           "TrainConfig", "check_values", "load_config", "load_yaml"]


@dataclass
class ModelConfig:
    """What to build: a preset name plus keyword overrides for ``create_model``.

    Fields left at ``None`` keep the preset's value. ``extra`` passes any further keyword
    argument of the model unchanged (e.g. ``{"dropout": 0.1}``).
    """

    name: str = "tiny"
    spatial_dims: int | None = None
    in_channels: int | None = None
    out_channels: int | None = None
    channels: list[int] | None = None
    temporal: str | None = None
    cell: str | None = None
    bidirectional: bool | None = None
    #: frames of memory of ``cell: attention`` (only with that cell)
    bank: int | None = None
    #: per-level, per-axis pooling strides (L - 1 entries) and conv kernels (L entries), in
    #: the arrays' axis order; each entry an int (all axes) or one int per axis
    strides: list[int | list[int]] | None = None
    kernel_sizes: list[int | list[int]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``create_model(self.name, **kwargs)``; ``None`` fields left out."""
        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("name", "extra") and getattr(self, f.name) is not None
        }
        if "channels" in out:
            out["channels"] = tuple(out["channels"])
        out.update(self.extra)
        return out


@dataclass
class DataConfig:
    """Training data: a datalist and how patches are cut from it.

    ``roi`` is the spatial patch size (one int per spatial axis, or one int for all);
    ``window`` the number of frames per patch. ``spacing`` is the voxel size the model works
    at (one value per spatial axis in the arrays' axis order, or one for all): training cases
    are resampled to it, and prediction resamples each input to it and the labels back to the
    input's grid; ``None`` (the default) keeps every case on its own grid. ``degrade`` degrades
    random input frames (:class:`clstm4d.data.Degrade`): ``"auto"`` (default) for models with
    temporal memory (every model but ``temporal: none``) and not for per-frame models, ``true``
    / ``false``, or a mapping of its arguments (``{prob: 0.25, kinds: [snr, defocus],
    strength: [0.25, 1.0]}``); see docs/training.md for the measurements behind the default.
    ``reverse_time``: the probability that a training window is played backwards (for data
    whose changes run both ways, e.g. cells that grow and shrink; not for tasks with an
    order such as a cue in the first frames); 0 (default): never.
    """

    datalist: str | None = None
    window: int = 8
    roi: list[int] | None = None
    spacing: list[float] | None = None
    batch_size: int = 2
    foreground_prob: float = 0.5
    normalize: str | None = "percentile"
    augment: bool = True
    degrade: bool | str | dict[str, Any] = "auto"
    num_workers: int = 0
    reverse_time: float = 0.0


@dataclass
class TrainConfig:
    """Optimiser, schedule, precision, logging and checkpoints.

    ``amp``: ``"auto"`` (bf16 on a CUDA device that supports it, else fp32), ``"bf16"``,
    ``"fp16"`` (CUDA only, with gradient scaling) or ``"none"``.
    ``recompute`` sets the model's ``recompute`` switch (activation checkpointing: keep less
    of the forward and compute it again in backward; same gradients, less memory).
    ``max_nonfinite_steps``: a step with a non-finite loss or gradient is skipped; this many in
    a row stop the run (0: never). ``dist_timeout``: seconds a ``torchrun`` rank waits for the
    others in a collective before it fails (a rank that died or hangs). ``memory``: the
    budget the run was planned for (``"2GB"``, ``"800MB"``; ``clstm4d plan`` writes it): the
    memory guard refuses a run whose predicted peak exceeds it (or the device's free memory,
    whichever is less). ``memory_model``: the process model's constants as ``clstm4d plan``
    measured them on the training device (``device``, ``runtime_mb``, ``step_scale``,
    ``validation_scale``; CUDA plans write it), used by the guard on a device of that type.
    ``tbptt``: truncated backpropagation through time: run each training window of
    ``data.window`` frames in chunks of this many frames, the recurrent state carried from
    chunk to chunk and detached between them (gradients within a chunk, memory of a chunk,
    one optimizer step per window); ``None`` (default) backpropagates the whole window.
    Needs a streamable (unidirectional) model.
    """

    out: str = "runs/train"
    steps: int = 200
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 10
    scheduler: str = "cosine"
    grad_clip: float | None = 1.0
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0
    unlabelled_weight: float = 0.0
    unlabelled_threshold: float = 0.9
    unlabelled_rampup: float = 0.25
    amp: str = "auto"
    recompute: bool = False
    device: str = "auto"
    seed: int = 0
    log_every: int = 10
    val_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    max_nonfinite_steps: int = 25
    dist_timeout: float = 1800.0
    progress: bool = True
    threads: int | None = None
    tbptt: int | None = None
    memory: str | None = None
    memory_model: dict[str, Any] | None = None


@dataclass
class PredictConfig:
    """Inference: sliding windows over space (``roi``, ``overlap``, Gaussian blending) and
    chunks of ``chunk`` frames over time with the recurrent state carried between chunks.

    ``roi=None`` runs each frame whole. Bidirectional models run the whole sequence in one
    pass unless ``time_margin`` is set (then chunks of ``chunk`` frames, each with
    ``time_margin`` frames of context on both sides).
    """

    roi: list[int] | None = None
    overlap: float = 0.25
    chunk: int = 16
    time_margin: int | None = None
    sw_batch_size: int = 1
    mode: str = "gaussian"
    device: str = "auto"
    amp: str = "auto"


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig,
             "predict": PredictConfig}
#: keys of earlier versions (saved configs, old YAML files), read under today's name
_RENAMED = {"train.activation_checkpointing": "train.recompute"}


def _renamed(section: str, key: str) -> str:
    """Today's name of the key ``section.key``."""
    return _RENAMED.get(f"{section}.{key}", f"{section}.{key}").partition(".")[2]

# Allowed ranges, checked after the type: key -> (low, high, low inclusive, high inclusive);
# None = unbounded. Lists are checked element by element; floats must also be finite.
_RANGES: dict[str, tuple] = {
    "model.spatial_dims": (1, 3, True, True), "model.in_channels": (1, None, True, True),
    "model.out_channels": (2, None, True, True), "model.channels": (1, None, True, True),
    "model.bank": (1, None, True, True),
    "data.window": (1, None, True, True), "data.roi": (1, None, True, True),
    "data.spacing": (0, None, False, True), "data.batch_size": (1, None, True, True),
    "data.foreground_prob": (0, 1, True, True), "data.num_workers": (0, None, True, True),
    "data.reverse_time": (0, 1, True, True),
    "train.steps": (1, None, True, True), "train.lr": (0, None, False, True),
    "train.weight_decay": (0, None, True, True), "train.warmup_steps": (0, None, True, True),
    "train.grad_clip": (0, None, False, True), "train.lambda_dice": (0, None, True, True),
    "train.lambda_ce": (0, None, True, True),
    "train.unlabelled_weight": (0, None, True, True),
    "train.unlabelled_threshold": (0, 1, False, False),
    "train.unlabelled_rampup": (0, 1, True, True), "train.seed": (0, 2**32 - 1, True, True),
    "train.log_every": (1, None, True, True), "train.val_every": (0, None, True, True),
    "train.checkpoint_every": (0, None, True, True),
    "train.keep_checkpoints": (0, None, True, True),
    "train.max_nonfinite_steps": (0, None, True, True),
    "train.dist_timeout": (0, None, False, True), "train.threads": (1, None, True, True),
    "train.tbptt": (1, None, True, True),
    "predict.roi": (1, None, True, True), "predict.overlap": (0, 1, True, False),
    "predict.chunk": (1, None, True, True), "predict.time_margin": (0, None, True, True),
    "predict.sw_batch_size": (1, None, True, True),
}
_CHOICES: dict[str, tuple] = {"train.scheduler": ("cosine", "constant"),
                              "predict.mode": ("gaussian", "constant")}


@dataclass
class Config:
    """The whole configuration; see the section dataclasses for every key."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, overrides: list[str] | None = None,
                  values: dict[str, Any] | None = None) -> Config:
        """Build from a nested dict (as read from YAML/JSON), then ``section.key=value``
        override strings, then ``values`` (``{"section.key": value}``, taken as they are:
        the command line's own options, already parsed; ``None`` values are left out).

        Override strings are parsed as YAML (``3`` -> int, ``[32, 32]`` -> list,
        ``none`` -> str).
        """
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ConfigError(
                f"configuration must be a mapping of sections, got {type(raw).__name__}"
            )
        errors: list[str] = []
        merged: dict[str, dict[str, Any]] = {}
        for section, entries in raw.items():
            if section not in _SECTIONS:
                errors.append(f"unknown section '{section}' (known sections: "
                              f"{', '.join(_SECTIONS)})")
            elif entries is not None and not isinstance(entries, dict):
                errors.append(f"section '{section}' must be a mapping, got {entries!r}")
            else:
                merged[section] = {_renamed(section, k): v for k, v in (entries or {}).items()}
        pairs = []
        for item in overrides or []:
            try:
                pairs.append((*_parse_override(item), item))
            except ConfigError as e:
                errors.append(str(e))
        pairs += [(key, value, key) for key, value in (values or {}).items() if value is not None]
        for key, value, given in pairs:
            section, _, name = key.partition(".")
            if section not in _SECTIONS or not name:
                errors.append(f"override '{given}' must look like SECTION.KEY=VALUE with "
                              f"SECTION one of {', '.join(_SECTIONS)}")
                continue
            merged.setdefault(section, {})[_renamed(section, name)] = value
        kwargs = {s: _build(_SECTIONS[s], s, merged.get(s, {}), errors) for s in _SECTIONS}
        _raise_all(errors)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A plain nested dict (JSON/YAML serialisable) that ``from_dict`` reads back."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


@dataclass(frozen=True)
class ModelSpec:
    """A model as :func:`clstm4d.models.create_model` builds it: the preset's name, the sizes
    every model has, and its other keyword arguments (``options``). A checkpoint saves the
    spec of the model it holds (``model.config``, complete: every argument, defaults too).

    Examples:
        >>> spec = ModelSpec.from_dict({"name": "tiny", "spatial_dims": 2, "in_channels": 1,
        ...                             "out_channels": 3, "checkpoint": True})
        >>> spec.spatial_dims, spec.options  # an old spelling is read as today's
        (2, {'recompute': True})
        >>> ModelSpec.from_dict(spec.to_dict()) == spec
        True
    """

    name: str
    spatial_dims: int
    in_channels: int
    out_channels: int
    options: dict[str, Any] = field(default_factory=dict)

    #: keys written by earlier versions, and what they are called now
    RENAMED: typing.ClassVar[dict[str, str]] = {"checkpoint": "recompute"}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "model_config") -> ModelSpec:
        """Read ``{"name": ..., "spatial_dims": ..., ...}`` (what :meth:`to_dict` writes and
        ``model.config`` holds); a malformed dict raises :class:`ConfigError` naming
        ``source``."""
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise ConfigError(f"{source}: expected a mapping with the model's 'name', got "
                              f"{raw!r:.80}")
        options = {cls.RENAMED.get(k, k): v for k, v in raw.items() if k != "name"}
        sizes = {}
        for key in ("spatial_dims", "in_channels", "out_channels"):
            value = options.pop(key, None)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
            sizes[key] = value
        return cls(raw["name"], options=options, **sizes)

    @classmethod
    def of(cls, model: Any) -> ModelSpec:
        """The spec of a built model (its ``config``)."""
        return cls.from_dict(dict(model.config), source=type(model).__name__)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "spatial_dims": self.spatial_dims,
                "in_channels": self.in_channels, "out_channels": self.out_channels,
                **self.options}

    def build(self) -> Any:
        """The model (``create_model``); its argument errors become one-line
        :class:`ConfigError` s."""
        return create(self.name, **{k: v for k, v in self.to_dict().items() if k != "name"})


def create(name: str, **kwargs: Any) -> Any:
    """``create_model`` with its argument errors turned into one-line configuration errors."""
    from clstm4d.models import create_model

    try:
        return create_model(name, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build model '{name}': {e}") from None


@dataclass
class SavedRun:
    """What a checkpoint's ``config.json`` holds, typed: the resolved configuration (sizes the
    data decided filled in), the spec that rebuilds the model, and the class names.

    On disk it is ``config.to_dict()`` plus two top-level keys, ``model_config`` (the
    :class:`ModelSpec` as a dict) and ``labels`` (``{"0": "background", ...}``).

    Examples:
        >>> spec = ModelSpec("tiny", spatial_dims=2, in_channels=1, out_channels=2)
        >>> run = SavedRun(Config(), spec, {0: "bg", 1: "lv"})
        >>> back = SavedRun.from_dict(run.to_dict())
        >>> back.model_spec.spatial_dims, back.labels[1], back.config.data.window
        (2, 'lv', 8)
    """

    config: Config
    model_spec: ModelSpec
    labels: dict[int, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = self.config.to_dict()
        out["model_config"] = self.model_spec.to_dict()
        out["labels"] = {str(k): v for k, v in sorted(self.labels.items())}
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "checkpoint config") -> SavedRun:
        """Parse what :meth:`to_dict` wrote; a malformed dict raises :class:`ConfigError`
        naming ``source``."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        raw = dict(raw)
        spec = ModelSpec.from_dict(raw.pop("model_config", None), f"{source}: model_config")
        labels = raw.pop("labels", None) or {}
        try:
            labels = {int(k): str(v) for k, v in dict(labels).items()}
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: 'labels' must map class indices to names, got "
                              f"{labels!r:.80}") from None
        try:
            config = Config.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        return cls(config, spec, labels)


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                values: dict[str, Any] | None = None) -> Config:
    """Read a YAML (or JSON) configuration file and apply ``section.key=value`` overrides.

    Args:
        path: the file, or ``None`` for the defaults.
        overrides: strings ``"section.key=value"``, applied after the file.
        values: ``{"section.key": value}``, applied last, taken as they are (see
            :meth:`Config.from_dict`).
    """
    raw: Any = None
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        raw = load_yaml(p.read_text(), str(p))
    return Config.from_dict(raw, overrides, values)


@functools.cache
def _yaml_loader():
    """A ``yaml.SafeLoader`` that reads numbers as a person writes them: YAML 1.1 (PyYAML)
    takes ``1e-3`` (no dot, or no sign in the exponent) for a string; this loader takes every
    decimal float YAML 1.2 allows (``1e-3``, ``1E5``, ``.5e3``, ``-2.5e+4``) for a float."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"""^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"""),
        list("-+0123456789."))
    return Loader


def load_yaml(text: str, source: str = "YAML") -> Any:
    """Parse ``text`` (YAML 1.1 as PyYAML reads it, with numbers in scientific notation read
    as numbers, see :func:`_yaml_loader`); a syntax error becomes a one-line
    :class:`ConfigError` naming ``source`` and the line.

    Examples:
        >>> load_yaml("{lr: 1e-3, steps: 10, name: 1e-3x}")
        {'lr': 0.001, 'steps': 10, 'name': '1e-3x'}
    """
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and start is not None and (mark is None or start.line != mark.line):
            context += f" that starts on line {start.line + 1}"
        raise ConfigError(f"cannot parse {source}{where}: {problem}"
                          + (f" ({context})" if context else "")) from None


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like SECTION.KEY=VALUE")
    key, text = item.split("=", 1)
    try:
        value = load_yaml(text) if text.strip() else None
    except ConfigError:
        value = text
    return key.strip(), value


def check_values(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """``{key: value}`` of one section checked and converted as a configuration file's are
    (type, range, choices); every problem in one :class:`ConfigError` naming
    ``section.key``.

    Examples:
        >>> check_values("predict", {"roi": 32, "chunk": 4})
        {'roi': [32], 'chunk': 4}
        >>> check_values("predict", {"sw_batch_size": 0})
        Traceback (most recent call last):
        ...
        clstm4d.errors.ConfigError: 'predict.sw_batch_size' must be >= 1, got 0
    """
    errors: list[str] = []
    built = _build(_SECTIONS[section], section, values, errors)
    _raise_all(errors)
    return {k: getattr(built, k) for k in values}


def _raise_all(errors: list[str]) -> None:
    """One :class:`ConfigError` listing every problem found (none: nothing)."""
    if errors:
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{len(errors)} configuration errors: " + "; ".join(errors))


def _build(cls: type, section: str, values: dict[str, Any], errors: list[str]):
    """The section's dataclass from ``values``; every problem is appended to ``errors`` (and
    its key left at the default) so that all of them are reported at once."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        if name not in fields:
            errors.append(f"unknown key '{section}.{name}' (known keys in '{section}': "
                          f"{', '.join(fields)})")
            continue
        try:
            kwargs[name] = _coerce(value, hints[name], f"{section}.{name}")
            _check_range(f"{section}.{name}", kwargs[name])
        except ConfigError as e:
            errors.append(str(e))
            kwargs.pop(name, None)
    return cls(**kwargs)


def _check_range(key: str, value: Any) -> None:
    """Raise a :class:`ConfigError` naming ``key`` when ``value`` is out of its range."""
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(f"'{key}' must be one of {', '.join(_CHOICES[key])}, got {value!r}")
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"'{key}' must be a finite number, got {value!r}")
    if key not in _RANGES:
        return
    low, high, low_in, high_in = _RANGES[key]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if (low is not None and (v < low or (v == low and not low_in))) or (
                high is not None and (v > high or (v == high and not high_in))):
            lo = "" if low is None else f"{'[' if low_in else '('}{low}"
            hi = "" if high is None else f"{high}{']' if high_in else ')'}"
            allowed = (f"in {lo}, {hi}" if low is not None and high is not None
                       else f"{'>=' if low_in else '>'} {low}" if low is not None
                       else f"{'<=' if high_in else '<'} {high}")
            raise ConfigError(f"'{key}' must be {allowed}, got {value!r}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a simple type hint; ints are accepted where floats are, and
    floats with an integral value (``1e4``) where ints are."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a list, got {value!r}")
        return [_coerce(v, item, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"'{key}' must be true or false, got {value!r}")
    if hint is int and isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        value = int(value)  # `steps: 1e4` (YAML reads a float) means 10000 steps
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"'{key}' must be an integer, got {value!r}")
    if not isinstance(value, hint):
        raise ConfigError(f"'{key}' must be of type {hint.__name__}, got {value!r}")
    return value
