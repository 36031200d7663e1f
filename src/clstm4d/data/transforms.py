"""Intensity normalisation, frame-consistent augmentation and per-frame degradation (numpy).

Shape legend: ``t`` frames, ``c`` channels, ``s`` / ``*s`` spatial axes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .degrade import DEGRADATIONS, degrade, parse_degradations

__all__ = ["normalize_intensity", "Augment", "Degrade", "NORMALIZATIONS"]

NORMALIZATIONS = (None, "percentile", "zscore")


def normalize_intensity(image: np.ndarray, mode: str | None = "percentile",
                        lower: float = 1.0, upper: float = 99.0) -> np.ndarray:
    """Normalise a whole case per channel, with the same statistics for every frame.

    Args:
        image: ``(t, c, *s)``.
        mode: ``"percentile"`` maps the ``lower``/``upper`` percentiles of each channel (over
            all frames and voxels) to 0/1 (values outside are kept, not clipped); ``"zscore"``
            subtracts the channel mean and divides by its standard deviation; ``None`` returns
            the image unchanged.
        lower, upper: percentiles for ``"percentile"``.

    Returns:
        ``(t, c, *s)`` float32. Statistics are per case, not per window, so frames stay
        comparable and training and inference see the same scaling.

    Examples:
        >>> x = np.arange(100, dtype=np.float32).reshape(1, 1, 10, 10)
        >>> y = normalize_intensity(x, "percentile", 0, 100)
        >>> float(y.min()), float(y.max())
        (0.0, 1.0)
        >>> z = normalize_intensity(x, "zscore")
        >>> round(float(z.mean()), 6), round(float(z.std()), 4)
        (0.0, 1.0)
    """
    if mode not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {mode!r}")
    image = np.asarray(image, dtype=np.float32)
    if image.ndim < 3:
        raise ValueError(f"image must be (t, c, *s), got shape {image.shape}")
    if mode is None:
        return image
    flat = np.moveaxis(image, 1, 0).reshape(image.shape[1], -1)  # (c, t*prod(s))
    if mode == "percentile":
        if not 0 <= lower < upper <= 100:
            raise ValueError(f"need 0 <= lower < upper <= 100, got lower={lower}, upper={upper}")
        lo, hi = np.percentile(flat, [lower, upper], axis=1)  # (c,), (c,)
        offset, scale = lo, hi - lo
    else:
        offset, scale = flat.mean(1), flat.std(1)
    scale = np.where(scale > 0, scale, 1.0)
    shape = (1, -1) + (1,) * (image.ndim - 2)
    return ((image - offset.reshape(shape)) / scale.reshape(shape)).astype(np.float32)


@dataclass
class Augment:
    """Random augmentations applied identically to every frame of a window.

    Args:
        flip: probability of flipping each spatial axis.
        rotate90: probability of a random multiple-of-90-degree rotation in a random plane of
            two spatial axes of equal size.
        scale: the intensities are multiplied by ``1 + U(-scale, scale)`` (one draw per window).
        shift: and shifted by ``U(-shift, shift)``.
        noise: standard deviation of added Gaussian noise (0 = none).

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> image, label = np.zeros((3, 1, 4, 4), np.float32), np.zeros((3, 4, 4), np.int64)
        >>> image[:, :, 0, 0] = 1; label[:, 0, 0] = 1
        >>> im, lb = Augment(flip=1.0, scale=0, shift=0)(image, label, rng)
        >>> bool((im[:, 0] == lb).all()), bool((lb[0] == lb[2]).all())
        (True, True)
    """

    flip: float = 0.5
    rotate90: float = 0.5
    scale: float = 0.1
    shift: float = 0.1
    noise: float = 0.0

    def __post_init__(self):
        for name in ("flip", "rotate90"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ValueError(f"Augment: {name} must be a probability in [0, 1], got {v}")
        for name in ("scale", "shift", "noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"Augment: {name} must be >= 0, got {getattr(self, name)}")

    def __call__(self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator):
        """Augment ``image (t, c, *s)`` and ``label (t, *s)`` (or None) the same way."""
        d = image.ndim - 2
        for axis in range(d):
            if rng.random() < self.flip:
                image = np.flip(image, 2 + axis)
                label = None if label is None else np.flip(label, 1 + axis)
        if d >= 2 and rng.random() < self.rotate90:
            planes = [(a, b) for a in range(d) for b in range(a + 1, d)
                      if image.shape[2 + a] == image.shape[2 + b]]
            if planes:
                a, b = planes[rng.integers(len(planes))]
                k = int(rng.integers(1, 4))
                image = np.rot90(image, k, axes=(2 + a, 2 + b))
                label = None if label is None else np.rot90(label, k, axes=(1 + a, 1 + b))
        image = np.ascontiguousarray(image, dtype=np.float32)
        if self.scale or self.shift:
            image = image * (1 + rng.uniform(-self.scale, self.scale)) + rng.uniform(
                -self.shift, self.shift)
            image = image.astype(np.float32)
        if self.noise:
            image = image + self.noise * rng.standard_normal(image.shape, dtype=np.float32)
        label = None if label is None else np.ascontiguousarray(label)
        return image, label


@dataclass
class Degrade:
    """Degrade random frames of a training window with the families of
    :mod:`clstm4d.data.degrade`, so that a model learns to lean on the frames around them.

    Every frame of the window is degraded independently with probability ``prob`` (frame 0
    only when ``first``), by a family drawn uniformly from ``kinds`` at a strength drawn
    uniformly from ``strength``; the random parameters of a family (blur direction, ghost
    shift, box, field) are drawn per frame, as the degradations in real sequences come and
    go frame by frame. Runs after :class:`Augment`, whose geometric transforms stay the same
    for every frame. Only the image changes: labels are left as they are (occluders are
    placed over the label's foreground, the label is not modified).

    Args:
        prob: probability that a frame is degraded.
        kinds: families (names or the groups ``"partial"``, ``"full"``, ``"all"``).
        strength: ``(low, high)`` range of strengths, within (0, 1].
        first: whether frame 0 of a window may be degraded (off by default: a unidirectional
            model has nothing to remember there).

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> image = np.random.default_rng(1).random((6, 1, 16, 16), dtype=np.float32)
        >>> out, degraded = Degrade(prob=0.5)(image, None, rng)
        >>> out.shape, degraded.tolist()
        ((6, 1, 16, 16), [False, False, True, False, False, False])
    """

    prob: float = 0.25
    kinds: tuple[str, ...] = DEGRADATIONS
    strength: tuple[float, float] = (0.25, 1.0)
    first: bool = False

    def __post_init__(self):
        if not 0 <= self.prob <= 1:
            raise ValueError(f"Degrade: prob must be in [0, 1], got {self.prob}")
        kinds = [self.kinds] if isinstance(self.kinds, str) else list(self.kinds)
        self.kinds = tuple(parse_degradations(kinds, owner="Degrade"))
        if not self.kinds:
            raise ValueError("Degrade: kinds must name at least one degradation")
        lo, hi = (float(v) for v in self.strength)
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"Degrade: strength must be (low, high) with 0 < low <= high <= 1,"
                             f" got {tuple(self.strength)}")
        self.strength = (lo, hi)

    def __call__(self, image: np.ndarray, label: np.ndarray | None,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Degrade frames of ``image (t, c, *s)`` (``label (t, *s)`` or None places
        occluders); returns ``(new image (t, c, *s) float32, degraded (t,) bool)``."""
        out = np.array(image, dtype=np.float32)
        degraded = np.zeros(len(out), bool)
        for f in range(0 if self.first else 1, len(out)):
            if rng.random() >= self.prob:
                continue
            kind = self.kinds[rng.integers(len(self.kinds))]
            strength = rng.uniform(*self.strength)
            out[f] = degrade(out[f], kind, strength, rng,
                             label=None if label is None else label[f])
            degraded[f] = True
        return out, degraded
