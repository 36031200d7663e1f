"""Synthetic 4D data: a beating ellipsoidal chamber and drifting blobs, with degraded frames.

Every case is a 2D+t or 3D+t sequence (1D+t works too) drawn deterministically from a seed:

- class 1, the *chamber*: an ellipse/ellipsoid whose semi-axes beat sinusoidally (one beat per
  ~1-1.6 sequences), slowly rotating and swaying;
- class 2, *blobs*: small discs/spheres that drift in a straight line at constant speed and
  pulse slightly, never touching the chamber or each other;
- the image: bright objects on a dim textured background, multiplied by a smooth bias field
  and a slowly drifting global gain, plus Gaussian noise;
- *degraded frames* (never frame 0, never two in a row), with the families of
  :mod:`clstm4d.data.degrade`: by default the full ones, ``"dropout"`` (the signal of the frame
  is gone: background and noise only) and ``"occlusion"`` (a box of object-like intensity
  hides every object and a random margin around it); on request the partial ones (reduced
  SNR, defocus, motion blur, ghosting, bias field and drift, partial occlusion), each with a
  strength. Labels stay exact on every frame, so on a degraded frame the earlier frames tell
  what the frame itself hides: a model with temporal memory can use them, a per-frame model
  cannot. ``meta["degraded"]`` lists those frames, ``meta["degradation"]`` their families and
  ``meta["degradation_strength"]`` the strengths.

A second task, *cue-then-track* (:func:`make_cue_track_case`), measures how long a model
remembers: two discs that look alike except during the first frames, labelled by identity;
*cue-shapes* (:func:`make_cue_shapes_case`) the same with 2-4 objects of varied form (discs,
polygons, cell-like blobs, glyph-like strokes; :mod:`clstm4d.data.shapes`), one family held out
from all tuning.

Shape legend: ``t`` frames, ``c`` channels, ``s`` / ``*s`` spatial axes, ``d`` spatial dims.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clstm4d._common import check_host_memory, check_spatial_dims
from clstm4d.errors import ConfigError

from ._common import Geometry
from .datalist import CaseData, save_datalist
from .degrade import DEGRADATIONS, FULL, degrade, parse_degradations, smooth_field
from .io import write_image, write_label

__all__ = ["CLASS_NAMES", "CUE_CLASS_NAMES", "TASKS", "make_synthetic_case",
           "make_cue_track_case", "make_cue_shapes_case", "write_synthetic_dataset",
           "DEFAULT_SIZE", "design_check"]

logger = logging.getLogger(__name__)

CLASS_NAMES = {0: "background", 1: "chamber", 2: "blob"}
CUE_CLASS_NAMES = {0: "background", 1: "cued", 2: "other"}
DEFAULT_SIZE = {1: 128, 2: 64, 3: 32}
FORMATS = {"nifti": (".nii.gz", False), "nifti-series": (".nii.gz", True),
           "nrrd-series": (".nrrd", True), "tiff": (".tif", False)}


def _shape(size, spatial_dims) -> tuple[int, ...]:
    check_spatial_dims(spatial_dims)
    if size is None:
        size = DEFAULT_SIZE[spatial_dims]
    shape = (int(size),) * spatial_dims if np.ndim(size) == 0 else tuple(int(n) for n in size)
    if len(shape) != spatial_dims or min(shape) < 16:
        raise ConfigError(f"size must be an int >= 16 or {spatial_dims} such ints, got {size!r}")
    return shape


def _rotation(d: int, basis: np.ndarray, angle: float) -> np.ndarray:
    """``basis @ G(angle)``: G rotates the first two coordinates (identity in 1D)."""
    if d == 1:
        return np.ones((1, 1))
    g = np.eye(d)
    c, s = np.cos(angle), np.sin(angle)
    g[:2, :2] = [[c, -s], [s, c]]
    return basis @ g


def _pick_degraded(rng, frames: int, count: int) -> list[int]:
    """``count`` frames in 1..t-1, no two adjacent (so the frame before each one is clean)."""
    chosen: set[int] = set()
    for f in rng.permutation(np.arange(1, frames)):
        if len(chosen) == count:
            break
        if f - 1 not in chosen and f + 1 not in chosen:
            chosen.add(int(f))
    return sorted(chosen)


def make_synthetic_case(seed: int | Sequence[int] = 0, frames: int = 10,
                        size: int | Sequence[int] | None = None, spatial_dims: int = 2, *,
                        blobs: int = 2, degraded: int | Sequence[int] | None = None,
                        degradation: str | Sequence[str] | Mapping[str, float] = FULL,
                        noise: float = 0.08, drift: float = 0.1,
                        spacing: float | Sequence[float] = 1.0, time_interval: float = 0.05,
                        name: str | None = None) -> CaseData:
    """Draw one synthetic sequence (see the module docstring for what it contains).

    Args:
        seed: int or sequence of ints (``numpy.random.default_rng`` seed); same seed, same case.
        frames: number of frames ``t`` (>= 1).
        size: spatial extent, an int (same on every axis) or one int per axis; default 64 in
            2D, 32 in 3D, 128 in 1D; at least 16. In voxels at spacing 1; the array has
            ``round(size / spacing)`` voxels per axis (at least 4), so the same scene is
            sampled more coarsely along an axis with a larger spacing.
        spatial_dims: 1, 2 or 3.
        blobs: number of drifting blobs (fewer if they cannot be placed apart).
        degraded: number of degraded frames (default ``round(t / 4)``, at most
            ``(t - 1 + 1) // 2``) or the explicit frame indices.
        degradation: the degradation families to draw from (one per degraded frame, uniformly)
            with their strengths: names (``"dropout"``, ``"snr"``, ..., or the groups
            ``"partial"``, ``"full"``, ``"all"``; partial families at strength 0.5, full ones
            at 1), ``"snr=0.3,defocus=0.5"``, or a mapping ``{name: strength}``; see
            :mod:`clstm4d.data.degrade`. Default: dropout and occlusion.
        noise: standard deviation of the Gaussian noise (object contrast is about 0.5-0.9).
        drift: relative amplitude of the slow global intensity drift.
        spacing: voxel size (mm), one value or one per axis (arrays' axis order), e.g.
            ``(1, 1, 4)`` for thick slices along the last axis. time_interval: seconds between
            frames.
        name: case name (default ``synth_<seed>``).

    Returns:
        :class:`CaseData` with image ``(t, 1, *s)`` float32, label ``(t, *s)`` int64 (classes
        :data:`CLASS_NAMES`), a NIfTI :class:`Geometry` and ``meta`` with ``"degraded"``
        (sorted frame indices), ``"degradation"`` (their families, same order) and
        ``"degradation_strength"`` (their strengths).

    Examples:
        >>> case = make_synthetic_case(seed=1, frames=8, size=32, spatial_dims=2)
        >>> case.image.shape, case.label.shape, case.meta["degraded"]
        ((8, 1, 32, 32), (8, 32, 32), [1, 5])
        >>> bool((make_synthetic_case(seed=1, frames=8, size=32).image == case.image).all())
        True
    """
    shape = _shape(size, spatial_dims)
    if frames < 1:
        raise ConfigError(f"frames must be >= 1, got {frames}")
    if blobs < 0:
        raise ConfigError(f"blobs must be >= 0, got {blobs}")
    strength_of = parse_degradations(degradation, owner="degradation")
    if not strength_of:
        raise ConfigError(f"degradation must name at least one of {list(DEGRADATIONS)}, got "
                          f"{degradation!r}")
    if noise < 0:
        raise ConfigError(f"noise must be >= 0, got {noise}")
    step = _spacing(spacing, spatial_dims)
    voxels = tuple(max(1, int(round(n / h))) for n, h in zip(shape, step, strict=True))
    if min(voxels) < 4:
        raise ConfigError(f"size {shape} at spacing {step} gives {voxels} voxels; every axis "
                          "needs at least 4 (use a larger size or a finer spacing)")
    _check_case_memory(frames, voxels)
    rng = np.random.default_rng(seed)
    # where the voxel centres lie in the scene: the voxels of a coarse axis tile the same extent
    # (at spacing 1, voxel i sits at i)
    centres = [((np.arange(v) + 0.5) * h - 0.5).astype(np.float32)
               for v, h in zip(voxels, step, strict=True)]
    grid = np.stack(np.meshgrid(*centres, indexing="ij"))  # (d, *s)
    t = np.arange(frames, dtype=np.float64)
    chamber = _chamber(rng, t, shape)
    tracks = _blob_tracks(rng, blobs, t, shape, chamber, seed)
    label = _draw_labels(grid, chamber, tracks, frames)
    # image formation
    background = 0.2 + smooth_field(rng, grid, shape, 0.05)
    bias = 1 + smooth_field(rng, grid, shape, 0.1)
    levels = np.array([0.0, rng.uniform(0.9, 1.1), rng.uniform(0.65, 0.8)], np.float32)
    gain = 1 + drift * np.sin(2 * np.pi * t / (rng.uniform(2, 4) * max(frames, 8))
                              + rng.uniform(0, 2 * np.pi))
    bad_frames = _degraded_frames(rng, frames, degraded)
    names = list(strength_of)
    kinds = [str(names[rng.integers(len(names))]) for _ in bad_frames]
    strengths = [strength_of[k] for k in kinds]
    image = np.empty((frames, 1, *voxels), np.float32)
    for i in range(frames):
        frame = background + np.where(label[i] > 0, levels[label[i]] - background, 0)
        if i in bad_frames:  # degraded before gain, bias field and noise, as a camera would
            j = bad_frames.index(i)
            frame = degrade(frame[None], kinds[j], strengths[j], rng, label=label[i],
                            background=0.7 * background, level=1.0, noise=0.0,
                            extent=float(min(shape)) / np.asarray(step))[0]
        frame = gain[i] * bias * frame + noise * rng.standard_normal(voxels, dtype=np.float32)
        image[i, 0] = frame
    geometry = Geometry.default("nifti", voxels, frames, spacing=step,
                                origin=[(h - 1) / 2 for h in step], time_interval=time_interval)
    meta = {"degraded": bad_frames, "degradation": kinds, "degradation_strength": strengths}
    return CaseData(image, label, geometry, meta, name or f"synth_{_seed_name(seed)}")


def _chamber(rng: np.random.Generator, t: np.ndarray, shape: tuple[int, ...]) -> dict:
    """The beating chamber: semi-axes ``(t, d)``, centres ``(t, d)`` (a small sway), the
    rotation basis and speed, and the beat period."""
    d, frames, length = len(shape), len(t), float(min(shape))
    period = rng.uniform(1.0, 1.6) * max(frames, 8)
    beat = np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi))  # (t,)
    semi0 = rng.uniform(*{1: (0.1, 0.15), 2: (0.12, 0.18), 3: (0.15, 0.21)}[d], d) * length
    amplitude = rng.uniform(0.12, 0.2, d)
    semi = semi0 * (1 + amplitude * beat[:, None])  # (t, d)
    extent = semi.max() + 1
    center0 = np.array([rng.uniform(extent + 2, n - extent - 2) for n in shape])
    sway = rng.uniform(-1, 1, d) * 0.02 * length
    centers = center0 + sway * np.cos(2 * np.pi * t / period)[:, None]  # (t, d)
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    omega = rng.uniform(-0.04, 0.04)
    angle0 = rng.uniform(0, np.pi)
    return {"semi": semi, "centers": centers, "basis": basis, "omega": omega,
            "angle0": angle0, "period": period}


def _blob_tracks(rng: np.random.Generator, blobs: int, t: np.ndarray, shape: tuple[int, ...],
                 chamber: dict, seed) -> list[tuple[np.ndarray, np.ndarray]]:
    """Blobs drifting straight at constant speed, pulsing slightly, kept apart from the
    chamber and each other: ``(positions (t, d), radii (t,))`` each."""
    d, length = len(shape), float(min(shape))
    semi, centers, period = chamber["semi"], chamber["centers"], chamber["period"]
    tracks: list[tuple[np.ndarray, np.ndarray]] = []
    rmin, rmax = (0.1, 0.13) if d == 3 else (0.07, 0.1)
    for _ in range(blobs):
        for _attempt in range(200):
            r0 = rng.uniform(rmin, rmax) * length
            radii = r0 * (1 + 0.05 * np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi)))
            direction = rng.normal(size=d)
            direction /= np.linalg.norm(direction)
            velocity = direction * rng.uniform(0.010, 0.018) * length
            start = np.array([rng.uniform(r0 + 2, n - r0 - 3) for n in shape])
            pos = start + t[:, None] * velocity  # (t, d)
            inside = ((pos - radii.max() - 1 >= 0) & (pos + radii.max() + 2 <= shape)).all()
            clear_c = (np.linalg.norm(pos - centers, axis=1) >= semi.max(1) + radii + 3).all()
            clear_b = all((np.linalg.norm(pos - p, axis=1) >= radii + r + 2).all()
                          for p, r in tracks)
            if inside and clear_c and clear_b:
                tracks.append((pos, radii))
                break
        else:
            logger.debug("make_synthetic_case(seed=%s): no room for another blob", seed)
    return tracks


def _draw_labels(grid: np.ndarray, chamber: dict, tracks, frames: int) -> np.ndarray:
    """Label maps ``(t, *s)``: 1 inside the (rotating) chamber, 2 inside the blobs."""
    d = grid.shape[0]
    label = np.zeros((frames, *grid.shape[1:]), np.int64)
    for i in range(frames):
        rot = _rotation(d, chamber["basis"], chamber["angle0"] + chamber["omega"] * i)
        offset = grid - chamber["centers"][i].reshape((d,) + (1,) * d)  # (d, *s)
        local = np.tensordot(rot.T, offset, axes=1)  # coordinates along the semi-axes
        inside = (np.square(local / chamber["semi"][i].reshape((d,) + (1,) * d))).sum(0) <= 1
        label[i][inside] = 1
        for pos, radii in tracks:
            offset = grid - pos[i].reshape((d,) + (1,) * d)
            label[i][np.square(offset).sum(0) <= radii[i] ** 2] = 2
    return label


def _degraded_frames(rng: np.random.Generator, frames: int, degraded) -> list[int]:
    """The degraded frames: drawn (``None``: a quarter of the frames; an int: that many) or
    given as indices."""
    if degraded is None:
        count = min(int(round(frames / 4)), frames // 2)
        return _pick_degraded(rng, frames, count)
    if np.ndim(degraded) == 0:
        if not 0 <= int(degraded) <= frames // 2:
            raise ConfigError(f"degraded: at most {frames // 2} non-adjacent frames after "
                              f"frame 0 fit in {frames} frames, got {degraded}")
        return _pick_degraded(rng, frames, int(degraded))
    bad_frames = sorted({int(f) for f in degraded})
    if any(not 0 <= f < frames for f in bad_frames):
        raise ConfigError(f"degraded: frame indices must be in [0, {frames}), got {degraded}")
    return bad_frames


def _check_case_memory(frames: int, shape: tuple[int, ...]) -> None:
    """Refuse, before drawing it, a case whose arrays would not fit in memory: its image
    (float32) and label (int64) per frame, plus about eight float64 volumes of scene."""
    voxels = float(np.prod(shape, dtype=np.float64))
    check_host_memory(voxels * (12 * frames + 64),
                      f"a synthetic case of {frames} frame(s) of {'x'.join(map(str, shape))} "
                      "voxels (lower --size or --frames)", error=ConfigError)


def _spacing(spacing, spatial_dims: int) -> tuple[float, ...]:
    values = (spacing,) * spatial_dims if np.ndim(spacing) == 0 else tuple(spacing)
    if len(values) != spatial_dims or not all(np.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"spacing must be a positive number or {spatial_dims} of them (one "
                         f"per spatial axis), got {spacing!r}")
    return tuple(float(v) for v in values)


def _seed_name(seed) -> str:
    return "_".join(str(s) for s in seed) if np.ndim(seed) else str(seed)


def _bounce(start: np.ndarray, velocity: np.ndarray, t: np.ndarray, lo: np.ndarray,
            hi: np.ndarray) -> np.ndarray:
    """Positions ``(t, d)`` of a point moving at constant velocity inside ``[lo, hi]``,
    reflected at the walls."""
    span = hi - lo
    x = np.mod(start - lo + t[:, None] * velocity, 2 * span)  # (t, d)
    return lo + span - np.abs(x - span)


def make_cue_track_case(seed: int | Sequence[int] = 0, frames: int = 24,
                        size: int | Sequence[int] | None = None, spatial_dims: int = 2, *,
                        cue_frames: int = 3, radius: float | None = None,
                        speed: tuple[float, float] = (0.03, 0.05), noise: float = 0.08,
                        spacing: float = 1.0, time_interval: float = 0.05,
                        name: str | None = None) -> CaseData:
    """Draw one cue-then-track sequence: how long does a model remember who is who?

    Two discs/spheres of the same size move at constant speed, bouncing off the walls, and
    pass close to each other at least once after the cue. During the first ``cue_frames``
    frames the *cued* one (class 1) is bright and the *other* (class 2) dim; afterwards both
    have the same intensity, so only memory of where each one went tells them apart. Labels
    mark the identity on every frame. A per-frame model is at chance after the cue (identity
    Dice about 0.5 for a perfect but identity-blind segmentation); a model that tracks keeps
    it. The discs never overlap (their distance stays above two radii + 1 voxel).

    Args:
        seed: ``numpy.random.default_rng`` seed; same seed, same case.
        frames: ``t`` (> ``cue_frames``).
        size: spatial size (int or one per axis, >= 16); default as :func:`make_synthetic_case`.
        spatial_dims: 1, 2 or 3.
        cue_frames: frames at the start in which the two differ (>= 1).
        radius: disc radius in voxels; default ``0.1 * min(size)``.
        speed: range of speeds, as fractions of ``min(size)`` per frame.
        noise: standard deviation of the Gaussian noise.
        spacing, time_interval, name: as :func:`make_synthetic_case`.

    Returns:
        :class:`CaseData`: image ``(t, 1, *s)`` float32, label ``(t, *s)`` int64 with classes
        :data:`CUE_CLASS_NAMES`, ``meta`` with ``"cue_frames"``, ``"closest_frame"`` (the
        frame of the closest approach after the cue) and empty ``"degraded"``.

    Examples:
        >>> case = make_cue_track_case(seed=0, frames=12, size=32)
        >>> case.image.shape, sorted(np.unique(case.label).tolist()), case.meta["cue_frames"]
        ((12, 1, 32, 32), [0, 1, 2], 3)
        >>> a, b = (case.image[5, 0][case.label[5] == k].mean() for k in (1, 2))
        >>> bool(abs(a - b) < 0.1), bool(case.image[0, 0][case.label[0] == 1].mean() > 0.8)
        (True, True)
    """
    shape = _shape(size, spatial_dims)
    if not 1 <= cue_frames < frames:
        raise ConfigError(f"cue_frames must be in [1, frames), got cue_frames={cue_frames}, "
                         f"frames={frames}")
    if noise < 0:
        raise ConfigError(f"noise must be >= 0, got {noise}")
    _check_case_memory(frames, shape)
    rng = np.random.default_rng(seed)
    d = spatial_dims
    length = float(min(shape))
    r = 0.1 * length if radius is None else float(radius)
    if not 1 <= r <= length / 5:
        raise ConfigError(f"radius must be in [1, {length / 5:g}] voxels for size {shape}, "
                         f"got {r:g}")
    t = np.arange(frames, dtype=np.float64)
    lo = np.full(d, r + 1.0)
    hi = np.asarray(shape, np.float64) - r - 2.0
    for _attempt in range(5000):
        tracks = []
        for _ in range(2):
            direction = rng.normal(size=d)
            direction /= np.linalg.norm(direction)
            velocity = direction * rng.uniform(*speed) * length
            tracks.append(_bounce(rng.uniform(lo, hi), velocity, t, lo, hi))
        dist = np.linalg.norm(tracks[0] - tracks[1], axis=1)  # (t,)
        if dist.min() >= 2 * r + 1 and dist[cue_frames:].min() <= 3.5 * r:
            break
    else:
        raise ConfigError(f"make_cue_track_case(seed={seed}): no pair of tracks that meet and "
                         f"never overlap in {shape} x {frames} frames; use a larger size or "
                         f"smaller radius")
    grid = np.indices(shape, dtype=np.float32)  # (d, *s)
    label = np.zeros((frames, *shape), np.int64)
    for k, pos in enumerate(tracks, start=1):
        for i in range(frames):
            offset = grid - pos[i].reshape((d,) + (1,) * d).astype(np.float32)
            label[i][np.square(offset).sum(0) <= r * r] = k
    image = _cue_image(rng, label, grid, shape, cue_frames, noise)
    geometry = Geometry.default("nifti", shape, frames, spacing=(spacing,) * d,
                                time_interval=time_interval)
    meta = {"degraded": [], "degradation": [], "cue_frames": int(cue_frames),
            "closest_frame": int(cue_frames + np.argmin(dist[cue_frames:]))}
    return CaseData(image, label, geometry, meta, name or f"cue_{_seed_name(seed)}")


def _objects_range(objects) -> tuple[int, int]:
    lo, hi = (objects, objects) if np.ndim(objects) == 0 else tuple(objects)
    if not 2 <= int(lo) <= int(hi) <= 8:
        raise ConfigError(f"objects must be an int or a (min, max) pair in [2, 8], got "
                          f"{objects!r}")
    return int(lo), int(hi)


def _shape_tracks(rng, radii: np.ndarray, t: np.ndarray, shape, cue_frames: int,
                  speed, min_gap: float, seed) -> tuple[np.ndarray, np.ndarray]:
    """Bouncing tracks ``(o, t, 2)`` for objects of bounding radii ``(o,)``: apart during the
    cue, never nearer than ``min_gap`` times the sum of two radii (below 1: partial overlaps),
    the cued object (0) passing close to another after the cue (centres nearer than 1.5
    times the two radii) before the last quarter of the frames. Also returns the centre
    distance of object 0 to its nearest other, relative to the two radii ``(t,)``."""
    length = float(min(shape))
    for _attempt in range(300):
        tracks: list[np.ndarray] = []
        for r in radii:  # one object at a time, each clear of those placed before
            lo, hi = np.full(2, r + 1.0), np.asarray(shape, np.float64) - r - 2.0
            for _try in range(100):
                direction = rng.normal(size=2)
                direction /= np.linalg.norm(direction)
                velocity = direction * rng.uniform(*speed) * length
                pos = _bounce(rng.uniform(lo, hi), velocity, t, lo, hi)  # (t, 2)
                dist = [np.linalg.norm(pos - p, axis=1) / (r + q)
                        for p, q in zip(tracks, radii, strict=False)]
                if all((d >= min_gap).all() and (d[:cue_frames] * (r + q) >= r + q + 1).all()
                       for d, q in zip(dist, radii, strict=False)):
                    tracks.append(pos)
                    break
            else:
                break
        if len(tracks) < len(radii):
            continue
        tracks_o = np.stack(tracks)  # (o, t, 2)
        near = np.min([np.linalg.norm(tracks_o[0] - tracks_o[j], axis=1) / (radii[0] + radii[j])
                       for j in range(1, len(radii))], axis=0)  # (t,)
        if near[cue_frames:max(cue_frames + 1, len(t) - len(t) // 4)].min() <= 1.5:
            return tracks_o, near  # a close pass before the last quarter
    raise ConfigError(f"make_cue_shapes_case(seed={seed}): no tracks for {len(radii)} objects "
                      f"that meet after the cue in {shape} x {len(t)} frames; use a larger "
                      f"size, fewer objects or smaller shapes")


def make_cue_shapes_case(seed: int | Sequence[int] = 0, frames: int = 16,
                         size: int | Sequence[int] | None = None, spatial_dims: int = 2, *,
                         shapes: str | Sequence[str] | None = None,
                         objects: int | Sequence[int] = (2, 4), cue_frames: int = 3,
                         scale: tuple[float, float] = (0.1, 0.16),
                         speed: tuple[float, float] = (0.02, 0.05), min_gap: float = 0.6,
                         noise: float = 0.08, spacing: float = 1.0,
                         time_interval: float = 0.05, name: str | None = None) -> CaseData:
    """Draw one cue-then-track sequence with objects of varied form (2D): who is who, when
    the objects are not discs?

    As :func:`make_cue_track_case`, but with 2-4 objects of the shape families of
    :mod:`clstm4d.data.shapes` (discs, polygons, cell-like blobs, glyph-like strokes), each
    with its own size, speed, slow rotation (and, for cells, a changing outline). During the
    first ``cue_frames`` frames the *cued* object (class 1) is bright and the others (class
    2) dim, and no two touch; afterwards all look alike, they bounce off the walls, pass
    close to each other and may overlap partly (the one drawn on top owns the overlap; its
    identity is the label there). The cued object passes close to another at least once.

    Args:
        seed, frames, size, noise, spacing, time_interval, name: as
            :func:`make_cue_track_case` (``spatial_dims`` must be 2).
        shapes: the families objects are drawn from (one per object, uniformly):
            ``"disc,polygon,cell"``, a list, ``"tuning"`` (the default:
            :data:`~clstm4d.data.shapes.TUNING_SHAPES`), ``"held-out"``
            (:data:`~clstm4d.data.shapes.HELD_OUT_SHAPES`: glyphs) or ``"all"``.
        objects: number of objects, an int or a ``(min, max)`` range (default 2-4).
        cue_frames: frames at the start in which the cued object differs (>= 1).
        scale: range of the radius of an object's bounding circle, as fractions of ``min(size)``.
        speed: range of speeds, as fractions of ``min(size)`` per frame.
        min_gap: the closest two objects' centres come, as a fraction of the sum of their
            radii (< 1 lets them overlap partly; 0.6 by default).

    Returns:
        :class:`CaseData` (classes :data:`CUE_CLASS_NAMES`) with ``meta``: ``"cue_frames"``,
        ``"shapes"`` (each object's family, the cued one first), ``"objects"``,
        ``"closest_frame"`` (after the cue, the frame where the cued object is nearest
        another), ``"overlap_frames"`` (frames where two objects overlap), empty
        ``"degraded"``.

    Examples:
        >>> case = make_cue_shapes_case(seed=0, frames=12, size=48, shapes="held-out")
        >>> case.image.shape, sorted(np.unique(case.label).tolist()), case.meta["shapes"][0]
        ((12, 1, 48, 48), [0, 1, 2], 'glyph')
    """
    from .shapes import draw_shape, parse_shapes, shape_mask

    if spatial_dims != 2:
        raise ConfigError(f"make_cue_shapes_case draws 2D shapes: spatial_dims must be 2, got "
                          f"{spatial_dims}")
    shape = _shape(size, spatial_dims)
    if not 1 <= cue_frames < frames:
        raise ConfigError(f"cue_frames must be in [1, frames), got cue_frames={cue_frames}, "
                          f"frames={frames}")
    if noise < 0 or not 0 <= min_gap:
        raise ConfigError(f"noise and min_gap must be >= 0, got {noise}, {min_gap}")
    families = parse_shapes(shapes)
    lo, hi = _objects_range(objects)
    rng = np.random.default_rng(seed)
    n = int(rng.integers(lo, hi + 1))
    kinds = [families[int(rng.integers(len(families)))] for _ in range(n)]
    forms = [draw_shape(k, rng) for k in kinds]
    length = float(min(shape))
    radii = rng.uniform(*scale, n) * length
    angle0, omega = rng.uniform(0, 2 * np.pi, n), rng.uniform(-0.08, 0.08, n)
    t = np.arange(frames, dtype=np.float64)
    tracks, near = _shape_tracks(rng, radii, t, shape, cue_frames, speed, min_gap, seed)
    grid = np.indices(shape, dtype=np.float32)  # (2, *s)
    label = np.zeros((frames, *shape), np.int64)
    overlap = []
    order = rng.permutation(n)  # drawing order: the last one drawn owns an overlap
    for i in range(frames):
        count = np.zeros(shape, np.int64)
        for k in order:
            mask = shape_mask(forms[k], grid, tracks[k, i], radii[k],
                              angle0[k] + omega[k] * i, float(i))
            label[i][mask] = 1 if k == 0 else 2
            count += mask
        if (count > 1).any():
            overlap.append(i)
    image = _cue_image(rng, label, grid, shape, cue_frames, noise)
    geometry = Geometry.default("nifti", shape, frames, spacing=(spacing,) * 2,
                                time_interval=time_interval)
    meta = {"degraded": [], "degradation": [], "cue_frames": int(cue_frames),
            "shapes": kinds, "objects": n, "overlap_frames": overlap,
            "closest_frame": int(cue_frames + np.argmin(near[cue_frames:]))}
    return CaseData(image, label, geometry, meta, name or f"cue_{_seed_name(seed)}")


def _cue_image(rng, label: np.ndarray, grid: np.ndarray, shape, cue_frames: int,
               noise: float) -> np.ndarray:
    """The image of a cue-then-track label ``(t, *s)``: the cued class bright and the other
    dim during the cue, both alike afterwards, on a smooth background under a bias field."""
    frames = label.shape[0]
    background = 0.2 + smooth_field(rng, grid, shape, 0.05)
    bias = 1 + smooth_field(rng, grid, shape, 0.1)
    image = np.empty((frames, 1, *shape), np.float32)
    for i in range(frames):
        levels = np.array([0.0, 1.0, 0.5] if i < cue_frames else [0.0, 0.75, 0.75], np.float32)
        frame = np.where(label[i] > 0, levels[label[i]], background)
        image[i, 0] = bias * frame + noise * rng.standard_normal(shape, dtype=np.float32)
    return image



#: task -> (case function, class names, datalist description)
TASKS = {
    "chamber": (make_synthetic_case, CLASS_NAMES,
                "Synthetic time-resolved data: a beating chamber (1) and drifting blobs (2); "
                "'degraded' lists the degraded frames, 'degradation' their families."),
    "cue-track": (make_cue_track_case, CUE_CLASS_NAMES,
                  "Synthetic cue-then-track sequences: two look-alike discs told apart only "
                  "during the first 'cue_frames' frames, labelled by identity (1 cued, "
                  "2 other) on every frame."),
    "cue-shapes": (make_cue_shapes_case, CUE_CLASS_NAMES,
                   "Synthetic cue-then-track sequences with 2-4 objects of varied form "
                   "(families in 'shapes'), the cued one told apart only during the first "
                   "'cue_frames' frames, labelled by identity (1 cued, 2 others)."),
}


def write_synthetic_dataset(out: str | os.PathLike, cases: int = 16, frames: int = 10,
                            size: int | Sequence[int] | None = None, spatial_dims: int = 2,
                            seed: int = 0, *, format: str = "nifti", validation: float = 0.25,
                            test: int = 0, task: str = "chamber", **case_kwargs: Any) -> Path:
    """Write a synthetic dataset as files plus a datalist JSON; returns the datalist path.

    Layout (``format="nifti"``): ``out/imagesTr/case_000.nii.gz``,
    ``out/labelsTr/case_000.nii.gz`` (test cases under ``imagesTs``/``labelsTs``) and
    ``out/datalist.json`` with ``"labels"``, ``"spatial_dims"`` and, per entry, the case's
    ``meta`` (``"degraded"``, ``"degradation"``, ``"degradation_strength"``; ``"cue_frames"``
    for the cue-then-track task).
    Series formats write one folder per case with ``frame_000...`` files (NRRD labels as
    ``.seg.nrrd``). Every file is written atomically and the datalist last, so an interrupted
    run never leaves a datalist pointing at missing files.

    Args:
        out: output folder (created).
        cases: number of labelled cases (training + validation).
        frames, size, spatial_dims: see :func:`make_synthetic_case`.
        seed: case ``i`` is drawn from ``(seed, i)``, so it does not depend on ``cases``.
        format: ``"nifti"`` (one 4D file per case), ``"nifti-series"``, ``"nrrd-series"``,
            ``"tiff"``.
        validation: fraction of ``cases`` put in the ``validation`` section (at least one when
            ``cases >= 2`` and the fraction is > 0).
        test: number of extra cases in the ``test`` section (written with labels).
        task: ``"chamber"`` (:func:`make_synthetic_case`), ``"cue-track"``
            (:func:`make_cue_track_case`) or ``"cue-shapes"`` (:func:`make_cue_shapes_case`).
        case_kwargs: passed to the task's function (``blobs``, ``noise``, ``degradation``, ...).

    Examples:
        >>> import tempfile
        >>> from clstm4d.data import load_datalist
        >>> tmpdir = tempfile.TemporaryDirectory()
        >>> path = write_synthetic_dataset(tmpdir.name, cases=3, frames=6, size=24)
        >>> dl = load_datalist(path)
        >>> len(dl.training), len(dl.validation), dl.labels, dl.spatial_dims
        (2, 1, {0: 'background', 1: 'chamber', 2: 'blob'}, 2)
        >>> tmpdir.cleanup()
    """
    if format not in FORMATS:
        raise ConfigError(f"format must be one of {sorted(FORMATS)}, got {format!r}")
    if task not in TASKS:
        raise ConfigError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    make_case, class_names, description = TASKS[task]
    if cases < 1 or test < 0:
        raise ConfigError(f"cases must be >= 1 and test >= 0, got cases={cases}, test={test}")
    if not 0 <= validation < 1:
        raise ConfigError(f"validation must be a fraction in [0, 1), got {validation}")
    out = Path(out)
    n_val = int(round(cases * validation))
    if validation > 0 and cases >= 2:
        n_val = min(max(n_val, 1), cases - 1)
    suffix, series = FORMATS[format]
    sections: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    for i in range(cases + test):
        name = f"case_{i:03d}"
        case = make_case((seed, i), frames, size, spatial_dims, name=name, **case_kwargs)
        geometry = Geometry.default(format, case.geometry.spatial_shape, frames,
                                    spacing=case.geometry.spacing,
                                    origin=case.geometry.origin,
                                    time_interval=case.geometry.time_interval)
        split = "Ts" if i >= cases else "Tr"
        image_out = out / f"images{split}" / (name if series else name + suffix)
        label_out = out / f"labels{split}" / (name if series else name + suffix)
        image_paths = write_image(case.image, geometry, image_out)
        label_paths = write_label(case.label, geometry, label_out)
        entry = {"name": name,
                 "image": image_paths if series else image_paths[0],
                 "label": label_paths if series else label_paths[0], **case.meta}
        section = "test" if i >= cases else ("validation" if i >= cases - n_val else "training")
        sections[section].append(entry)
    settings = {"cases": cases, "frames": frames, "size": list(case.geometry.spatial_shape),
                "spatial_dims": spatial_dims, "seed": seed, "format": format,
                "validation": validation, "test": test, "task": task, **case_kwargs}
    return save_datalist(
        out / "datalist.json", **sections, labels=class_names, spatial_dims=spatial_dims,
        name="clstm4d-synthetic", description=description,
        tensorImageSize=f"{spatial_dims + 1}D", modality={"0": "synthetic"},
        time_interval=case.geometry.time_interval, synthetic=settings,
        numTraining=len(sections["training"]) + len(sections["validation"]),
        numTest=len(sections["test"]),
    )


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * (a & b).sum() / total)


def design_check(cases: int = 8, frames: int = 10, size: int | Sequence[int] | None = None,
                 spatial_dims: int = 2, seed: int = 0, **case_kwargs: Any) -> dict[str, float]:
    """Measure, without a network, how much a degraded frame needs the earlier frames.

    Foreground Dice (all classes > 0 together), averaged over frames of ``cases`` cases drawn
    as :func:`write_synthetic_dataset` draws them:

    - ``clean_threshold``: the best global intensity threshold of each clean frame (an oracle
      per-frame rule: the threshold is chosen knowing the truth);
    - ``degraded_threshold``: the same on degraded frames;
    - ``degraded_copy_previous``: copying the previous frame's mask to the degraded frame
      (what remembering the sequence gives, without any extrapolation).

    Examples:
        >>> r = design_check(cases=2, frames=8, size=32)
        >>> r["degraded_copy_previous"] > 0.7 > r["degraded_threshold"]
        True
    """
    clean, degraded_thr, degraded_copy = [], [], []
    for i in range(cases):
        case = make_synthetic_case((seed, i), frames, size, spatial_dims, **case_kwargs)
        fg = case.label > 0
        bad = case.meta["degraded"]
        for t in range(frames):
            image = case.image[t, 0]
            levels = np.quantile(image, np.linspace(0.0, 0.995, 100))
            best = max(_dice(image > q, fg[t]) for q in levels)
            if t in bad:
                degraded_thr.append(best)
                degraded_copy.append(_dice(fg[t - 1], fg[t]))
            else:
                clean.append(best)
    return {"clean_threshold": float(np.mean(clean)),
            "degraded_threshold": float(np.mean(degraded_thr)) if degraded_thr else float("nan"),
            "degraded_copy_previous": (float(np.mean(degraded_copy)) if degraded_copy
                                        else float("nan")),
            "degraded_frames": len(degraded_thr), "clean_frames": len(clean)}
