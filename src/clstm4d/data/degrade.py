"""Image degradations of single frames: the families used by the synthetic data and by training.

Each family turns one frame into a harder one while the objects stay where the label says.
:func:`degrade` is the one entry point; the synthetic generator calls it on chosen frames
(:func:`clstm4d.data.make_synthetic_case`) and :class:`clstm4d.data.transforms.Degrade` calls
it on random frames of training windows, so every family is written once.

Families (``strength`` in (0, 1]; 0.5 is "moderate", the level the measurements in
docs/training.md use; 1 the strongest):

- partial degradations (a per-frame model still sees most of the objects):

  - ``"snr"``: reduced signal-to-noise ratio: the contrast around the frame's median shrinks
    by ``1 - 0.6 s`` and Gaussian noise of ``0.3 s`` x the frame's 1-99 percentile range is
    added;
  - ``"defocus"``: Gaussian blur of ``sigma = 5 s`` voxels on every spatial axis;
  - ``"motion"``: motion blur: the mean of the frame shifted along a random direction over a
    path of ``1 + 20 s`` voxels;
  - ``"ghosting"``: a copy of the frame wrapped around by 20-50 % of the field along a random
    axis (MRI-style ghost), added with amplitude ``0.7 s`` (relative to the median);
  - ``"bias"``: intensity drift and bias field: a smooth multiplicative field
    ``exp(0.8 s f)``, a smooth additive field of ``0.4 s`` x the range and a global gain
    ``exp(U(-0.5, 0.5) s)``;
  - ``"partial_occlusion"``: a box of ``0.15 + 0.35 s`` of the field per axis (+-20 %),
    centred on a random foreground voxel when a label is given, filled with an object-like
    intensity;

- full degradations (the frame alone says nothing about the objects):

  - ``"dropout"``: the signal is gone: the frame is blended (weight ``s``) into a background
    (given, or the frame's 10th percentile) plus noise;
  - ``"occlusion"``: a box covering all the foreground of the label with random margins of
    8-25 % of the field, blended (weight ``s``) into an object-like intensity.

Object-like intensity (occluders) is ``level`` x ``U(0.85, 1.05)``, ``level`` given or the
frame's 99th percentile. Filled regions get Gaussian noise of standard deviation ``noise``
(given, or estimated from the frame), so they do not look smoother than the rest.

Shape legend: ``c`` channels, ``s`` / ``*s`` spatial axes, ``d`` spatial dims.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from clstm4d.errors import ConfigError

__all__ = ["DEGRADATIONS", "PARTIAL", "FULL", "degrade", "parse_degradations", "noise_sigma",
           "smooth_field", "occluder_box"]

PARTIAL = ("snr", "defocus", "motion", "ghosting", "bias", "partial_occlusion")
FULL = ("dropout", "occlusion")
#: every family, partial first
DEGRADATIONS = PARTIAL + FULL


def smooth_field(rng: np.random.Generator, grid: np.ndarray, shape: Sequence[int],
                 amplitude: float, waves: int = 4) -> np.ndarray:
    """A smooth random field (sum of low-frequency plane waves), values in about +-amplitude.

    Args:
        grid: ``(d, *s)`` coordinates of the voxels (``np.indices(shape)`` at spacing 1).
        shape: the extent the waves are relative to (in the units of ``grid``).

    Returns:
        ``(*s)`` float32, the shape of ``grid[0]``.
    """
    field = np.zeros(grid.shape[1:], np.float32)
    for _ in range(waves):
        freq = rng.integers(-2, 3, len(shape))
        if not freq.any():
            freq[0] = 1
        k = 2 * np.pi * freq / np.asarray(shape)
        field += np.cos(np.tensordot(k, grid, axes=1) + rng.uniform(0, 2 * np.pi))
    return (amplitude / np.sqrt(waves / 2)) * field


def occluder_box(rng: np.random.Generator, label: np.ndarray | None, shape: Sequence[int],
                 length: float | Sequence[float]) -> tuple[slice, ...]:
    """Index tuple of a box that covers all foreground of ``label (*s)`` with random margins
    of 8-25 % of ``length`` (voxels; one value or one per axis) (the centre half of the field
    when there is no foreground)."""
    length = np.broadcast_to(np.asarray(length, np.float64), (len(shape),))
    fg = np.argwhere(label > 0) if label is not None else np.zeros((0, len(shape)))
    if len(fg) == 0:
        lo = np.array(shape) // 4
        hi = np.array(shape) - lo
    else:
        lo, hi = fg.min(0), fg.max(0) + 1
    slices = []
    for a, (lo_a, hi_a) in enumerate(zip(lo, hi, strict=True)):
        m0, m1 = rng.uniform(0.08, 0.25, 2) * length[a]
        slices.append(slice(max(0, int(lo_a - m0)), min(shape[a], int(np.ceil(hi_a + m1)))))
    return tuple(slices)


def noise_sigma(frame: np.ndarray) -> np.ndarray:
    """Robust estimate of the Gaussian noise level of each channel of ``frame (c, *s)``: the
    median absolute deviation of differences of neighbours along the last axis, / sqrt(2).

    Returns:
        ``(c,)``.
    """
    diff = np.diff(frame, axis=-1).reshape(frame.shape[0], -1)  # (c, m)
    mad = np.median(np.abs(diff - np.median(diff, axis=1, keepdims=True)), axis=1)
    return (1.4826 / np.sqrt(2)) * mad


class _Frame:
    """One frame being degraded and what the families may need to know about it."""

    def __init__(self, x, rng, label, background, level, noise, extent):
        self.x = x  # (c, *s) float32, a private copy
        self.rng = rng
        self.label = label
        self.background = background
        self._level = level
        self._noise = noise
        self.spatial = x.shape[1:]
        self.d = len(self.spatial)
        self.extent = float(min(self.spatial)) if extent is None else extent
        self.axes = tuple(range(1, x.ndim))

    def per_channel(self, values) -> np.ndarray:
        return np.asarray(values, np.float32).reshape((-1,) + (1,) * self.d)  # (c, 1, ...)

    def percentile(self, q):
        return self.per_channel(np.percentile(self.x, q, axis=self.axes))

    def range(self):
        return self.percentile(99) - self.percentile(1)

    def level(self):
        """Object-like intensity for an occluder: ``level`` or the 99th percentile."""
        ref = self.percentile(99) if self._level is None else self._level
        return ref * self.rng.uniform(0.85, 1.05)

    def noisy(self, values, s):
        """``values`` plus the frame's noise (nothing drawn when the noise level is 0)."""
        sigma = noise_sigma(self.x) if self._noise is None else np.float32(self._noise)
        if not np.any(sigma > 0):
            return values
        sigma = self.per_channel(np.broadcast_to(sigma, (self.x.shape[0],)))
        return values + s * sigma * self.rng.standard_normal(np.shape(values), dtype=np.float32)


def _snr(f: _Frame, s: float) -> np.ndarray:
    med = f.percentile(50)
    noise = 0.3 * s * f.range() * f.rng.standard_normal(f.x.shape, dtype=np.float32)
    return med + (f.x - med) * (1 - 0.6 * s) + noise


def _defocus(f: _Frame, s: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(f.x, sigma=(0,) + (5.0 * s,) * f.d, mode="nearest")


def _motion(f: _Frame, s: float) -> np.ndarray:
    from scipy.ndimage import shift

    direction = f.rng.normal(size=f.d)
    direction /= np.linalg.norm(direction) or 1.0
    path = 1 + 20 * s  # voxels
    steps = int(np.ceil(path)) + 1
    out = np.zeros_like(f.x)
    for u in np.linspace(-0.5, 0.5, steps):
        out += shift(f.x, (0, *(u * path * direction)), order=1, mode="nearest")
    return out / steps


def _ghosting(f: _Frame, s: float) -> np.ndarray:
    axis = int(f.rng.integers(f.d))
    offset = int(round(f.spatial[axis] * f.rng.uniform(0.2, 0.5)))
    med = f.percentile(50)
    return f.x + 0.7 * s * (np.roll(f.x, offset, axis=1 + axis) - med)


def _bias(f: _Frame, s: float) -> np.ndarray:
    grid = np.indices(f.spatial, dtype=np.float32)
    mult = smooth_field(f.rng, grid, f.spatial, 1.0, waves=2)
    add = smooth_field(f.rng, grid, f.spatial, 1.0, waves=2)
    gain = np.exp(f.rng.uniform(-0.5, 0.5) * s)
    return gain * f.x * np.exp(0.8 * s * mult) + 0.4 * s * f.range() * add


def _partial_occlusion(f: _Frame, s: float) -> np.ndarray:
    fg = np.argwhere(f.label > 0) if f.label is not None else np.zeros((0, f.d))
    if len(fg):
        centre = fg[f.rng.integers(len(fg))]
    else:
        centre = np.array([f.rng.uniform(0, n) for n in f.spatial])
    side = (0.15 + 0.35 * s) * np.asarray(f.spatial) * f.rng.uniform(0.8, 1.2, f.d)
    box = tuple(slice(max(0, int(c - h / 2)), min(n, int(np.ceil(c + h / 2))))
                for c, h, n in zip(centre, side, f.spatial, strict=True))
    out = f.x.copy()
    level = f.level()
    out[(slice(None), *box)] = f.noisy(np.broadcast_to(level, out[(slice(None), *box)].shape), 1.0)
    return out


def _dropout(f: _Frame, s: float) -> np.ndarray:
    fill = f.percentile(10) if f.background is None else f.background
    return f.noisy((1 - s) * f.x + s * fill, s)


def _occlusion(f: _Frame, s: float) -> np.ndarray:
    box = (slice(None), *occluder_box(f.rng, f.label, f.spatial, f.extent))
    out = f.x.copy()
    level = f.level()
    out[box] = f.noisy((1 - s) * out[box] + s * level, s)
    return out


_FAMILIES: dict[str, Callable[[_Frame, float], np.ndarray]] = {
    "snr": _snr, "defocus": _defocus, "motion": _motion, "ghosting": _ghosting, "bias": _bias,
    "partial_occlusion": _partial_occlusion, "dropout": _dropout, "occlusion": _occlusion,
}


def degrade(frame: np.ndarray, kind: str, strength: float, rng: np.random.Generator, *,
            label: np.ndarray | None = None, background: np.ndarray | float | None = None,
            level: float | None = None, noise: float | None = None,
            extent: float | Sequence[float] | None = None) -> np.ndarray:
    """Degrade one frame with family ``kind`` (see the module docstring).

    Args:
        frame: ``(c, *s)``; not modified.
        kind: one of :data:`DEGRADATIONS`.
        strength: in (0, 1].
        rng: the generator every random choice is drawn from (same state, same result).
        label: ``(*s)`` labels of the frame (occluders are placed over its foreground);
            never modified, and the objects it marks stay where they are.
        background: what the frame looks like without signal (``"dropout"``), ``(*s)`` or a
            scalar; default: the frame's 10th percentile per channel.
        level: reference object intensity for occluders; default the 99th percentile.
        noise: noise standard deviation given to filled regions; default estimated from the
            frame (:func:`noise_sigma`); 0 adds none (and draws nothing).
        extent: the size of the scene in voxels (one value or one per axis) that the margins
            of ``"occlusion"`` are relative to; default the smallest spatial size.

    Returns:
        ``(c, *s)``, float64 for a float64 frame, else float32.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> x = np.zeros((1, 16, 16), np.float32); x[0, 4:12, 4:12] = 1
        >>> y = degrade(x, "defocus", 0.5, rng)
        >>> y.shape, bool(y[0, 8, 8] < 1 and y[0, 3, 8] > 0)
        ((1, 16, 16), True)
        >>> bool((degrade(x, "dropout", 1.0, rng, background=0.2, noise=0) == 0.2).all())
        True
    """
    if kind not in _FAMILIES:
        raise ValueError(f"degradation kind must be one of {list(DEGRADATIONS)}, got {kind!r}")
    if not 0 < strength <= 1:
        raise ValueError(f"degradation strength must be in (0, 1], got {strength!r} for {kind!r}")
    # a copy (the caller's frame stays as it is) in float32, or float64 when given float64
    dtype = np.float64 if np.asarray(frame).dtype == np.float64 else np.float32
    x = np.array(frame, dtype=dtype)
    if x.ndim < 2:
        raise ValueError(f"degrade: frame must be (c, *s) with 1-3 spatial axes, got shape "
                         f"{x.shape}")
    if label is not None and np.shape(label) != x.shape[1:]:
        raise ValueError(f"degrade: label shape {np.shape(label)} does not match the frame's "
                         f"spatial shape {x.shape[1:]}")
    out = _FAMILIES[kind](_Frame(x, rng, label, background, level, noise, extent),
                          float(strength))
    return np.ascontiguousarray(out, dtype=dtype)


def parse_degradations(spec: str | Sequence[str] | Mapping[str, float] | None,
                       default_strength: float = 0.5, owner: str = "degradations"
                       ) -> dict[str, float]:
    """``{kind: strength}`` from ``"snr=0.5,defocus"``, ``["snr=0.5", "dropout"]``, a mapping,
    or the group names ``"partial"`` / ``"full"`` / ``"all"``.

    Kinds without a strength get ``default_strength`` (full degradations get 1.0).

    Examples:
        >>> parse_degradations("snr=0.3,dropout")
        {'snr': 0.3, 'dropout': 1.0}
        >>> list(parse_degradations("partial"))[:3]
        ['snr', 'defocus', 'motion']
    """
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        items = [(str(k), v) for k, v in spec.items()]
    else:
        parts = spec.split(",") if isinstance(spec, str) else list(spec)
        items = []
        for part in (p.strip() for p in parts):
            if not part:
                continue
            name, eq, value = part.partition("=")
            try:
                items.append((name.strip(), float(value) if eq else None))
            except ValueError:
                raise ConfigError(f"{owner}: strength of {name!r} must be a number, got "
                                 f"{value!r}") from None
    groups = {"partial": PARTIAL, "full": FULL, "all": DEGRADATIONS}
    out: dict[str, float] = {}
    for name, value in items:
        for kind in groups.get(name, (name,)):
            if kind not in _FAMILIES:
                raise ConfigError(f"{owner}: unknown degradation {kind!r}; choose from "
                                 f"{list(DEGRADATIONS)} or partial, full, all")
            strength = (1.0 if kind in FULL else default_strength) if value is None else value
            if not 0 < strength <= 1:
                raise ConfigError(f"{owner}: strength of {kind!r} must be in (0, 1], got "
                                 f"{strength}")
            out[kind] = float(strength)
    return out
