"""What ``clstm4d evaluate`` scores: a prediction and its reference, read, checked to lie on one
voxel grid (or resampled onto the reference's when asked) and to hold only the classes of one
declared class set.

Shape legend: ``t`` frames, ``*s`` spatial axes.

The class set comes from a datalist's ``labels``, a checkpoint's labels, or
``num_classes``; a value outside it, in the prediction or the reference, is refused naming
the class and the file. Without any of them the classes are those the two files hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clstm4d._common import GRID_ATOL, check_int
from clstm4d.errors import ConfigError, UserError

__all__ = ["ClassSet", "class_set", "parse_frames", "resample_nearest", "same_grid_or_resample"]


@dataclass
class ClassSet:
    """The classes a prediction may hold.

    Attributes:
        num_classes: ``k`` including background (the ``"ignore"`` class not counted).
        names: foreground class index -> name (``class<k>`` where none is known).
        source: what declared the set (``"datalist x.json"``, ``"checkpoint ..."``,
            ``"--num-classes 3"``), or ``None`` when it was read off the values.
        ignore_index: the label value of unannotated voxels (reference only), or ``None``.
    """

    num_classes: int
    names: dict[int, str] = field(default_factory=dict)
    source: str | None = None
    ignore_index: int | None = None

    def __post_init__(self):
        self.names = {k: self.names.get(k, f"class{k}") for k in range(1, self.num_classes)}

    def check(self, values: np.ndarray, path: Any, what: str) -> None:
        """Refuse ``values`` holding a class outside the set (one line: class, voxel count,
        file, the set and where it came from)."""
        if self.source is None:
            return
        allowed = set(range(self.num_classes))
        if what == "reference" and self.ignore_index is not None:
            allowed.add(self.ignore_index)
        present, counts = np.unique(values, return_counts=True)
        extra = [(int(v), int(n)) for v, n in zip(present, counts, strict=True)
                 if int(v) not in allowed]
        if extra:
            listed = ", ".join(f"class {v} ({n} voxel{'s' * (n != 1)})" for v, n in extra[:5])
            raise UserError(f"{path}: the {what} holds {listed}, outside the {self.num_classes} "
                            f"classes 0-{self.num_classes - 1} of {self.source}")


def class_set(*, num_classes: int | None = None, labels: dict[int, str] | None = None,
              labels_source: str | None = None, ignore_index: int | None = None,
              values: Sequence[np.ndarray] = ()) -> ClassSet:
    """The class set: ``num_classes`` (the option) before the ``labels`` of a datalist or
    checkpoint (their names are kept either way); without both, the largest value in
    ``values`` (``ignore_index`` voxels aside) + 1, at least 2."""
    labels = dict(labels or {})
    names = {k: v for k, v in labels.items() if k and k != ignore_index}
    if num_classes is not None:
        try:
            k = check_int("--num-classes", num_classes, 2)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{e} (classes including background)") from None
        return ClassSet(k, names, f"--num-classes {k}", ignore_index)
    if labels:
        return ClassSet(max(2, max(names, default=0) + 1), names, labels_source, ignore_index)
    top = 0
    for v in values:
        v = np.asarray(v)
        kept = v[v != ignore_index] if ignore_index is not None else v
        top = max(top, int(kept.max()) if kept.size else 0)
    return ClassSet(max(2, top + 1), names, None, ignore_index)


def parse_frames(frames: str | Sequence[int], t: int | None = None,
                 option: str = "frames") -> list[int]:
    """Frame indices from ``"0,10"`` or a sequence, checked against ``t`` frames.

    Examples:
        >>> parse_frames("0, 10", 12)
        [0, 10]
    """
    if isinstance(frames, str):
        try:
            frames = [int(x) for x in frames.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--{option} must be comma-separated frame numbers, got "
                            f"{frames!r}") from None
    out = [int(f) for f in frames]
    if not out or len(set(out)) != len(out) or min(out) < 0:
        raise UserError(f"--{option}: expected distinct frame indices >= 0, got {out}")
    if t is not None and max(out) >= t:
        raise UserError(f"--{option}: expected frame indices 0-{t - 1} (the sequence has {t} "
                        f"frames), got {[f for f in out if f >= t]}")
    return out


def _describe(geometry) -> str:
    def fmt(values):
        return "x".join(f"{v:g}" for v in values)

    return (f"shape {fmt(geometry.spatial_shape)}, spacing {fmt(geometry.spacing)}, "
            f"origin {fmt(geometry.origin)}")


def _differs(pred, ref) -> str:
    """Which parts of two grids differ (for the message)."""
    parts = []
    if tuple(pred.spatial_shape) != tuple(ref.spatial_shape):
        parts.append("shape")
    if not np.allclose(pred.spacing, ref.spacing, atol=GRID_ATOL):
        parts.append("spacing")
    if not np.allclose(pred.origin, ref.origin, atol=GRID_ATOL):
        parts.append("origin")
    if not np.allclose(pred.direction, ref.direction, atol=GRID_ATOL):
        parts.append("axis directions (a flipped or rotated axis)")
    return " and ".join(parts) or "affine"


def same_grid_or_resample(pred: np.ndarray, pred_geometry, ref_geometry, *, pred_path: Any,
                          ref_path: Any, resample: bool = False) -> np.ndarray:
    """``pred (t, *s)`` on the reference's grid: as it is when both grids agree (shape and
    affine within :data:`clstm4d._common.GRID_ATOL`), resampled onto it (nearest neighbour,
    :func:`resample_nearest`) when ``resample``; else a one-line :class:`UserError` naming
    both files and what differs."""
    if pred.shape[0] != ref_geometry.frames:
        raise UserError(f"prediction {pred_path} has {pred.shape[0]} frames and the label "
                        f"{ref_path} {ref_geometry.frames}: they must have the same frames")
    if pred_geometry.spatial_dims != ref_geometry.spatial_dims:
        raise UserError(f"prediction {pred_path} has {pred_geometry.spatial_dims} spatial axes "
                        f"and the label {ref_path} {ref_geometry.spatial_dims}")
    if pred_geometry.same_grid(ref_geometry):
        return pred
    if resample:
        return resample_nearest(pred, pred_geometry, ref_geometry)
    raise UserError(
        f"prediction {pred_path} ({_describe(pred_geometry)}) and label {ref_path} "
        f"({_describe(ref_geometry)}) are not on the same voxel grid (their "
        f"{_differs(pred_geometry, ref_geometry)} differ); pass --resample-to-label to resample "
        "the prediction onto the label's grid (nearest neighbour)")


def resample_nearest(labels: np.ndarray, geometry, target) -> np.ndarray:
    """Labels ``(t, *s)`` on ``geometry``'s grid, resampled onto ``target``'s grid by nearest
    neighbour in world coordinates (both affines); voxels of ``target`` outside ``geometry``'s
    field of view get background (0).

    Shape:
        ``(t, *geometry.spatial_shape)`` -> ``(t, *target.spatial_shape)``, same dtype.
    """
    from scipy.ndimage import affine_transform

    d = target.spatial_dims
    src = np.asarray(geometry.affine, float)
    dst = np.asarray(target.affine, float)
    inv = np.linalg.pinv(src[:3, :d])  # world -> source index (least squares for d < 3)
    matrix = inv @ dst[:3, :d]  # target index -> source index
    offset = inv @ (dst[:3, 3] - src[:3, 3])
    out = np.empty((labels.shape[0], *target.spatial_shape), labels.dtype)
    for f in range(labels.shape[0]):
        out[f] = affine_transform(labels[f], matrix, offset, output_shape=out.shape[1:],
                                  order=0, mode="constant", cval=0)
    return out


def label_path(paths: Any) -> str:
    """How messages name a file argument (one path, or the first of several)."""
    if isinstance(paths, (str, Path)):
        return str(paths)
    paths = list(paths)
    return str(paths[0]) + (f" (+{len(paths) - 1} files)" if len(paths) > 1 else "")
