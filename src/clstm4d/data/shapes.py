"""Procedural 2D shape families for the cue-then-track data: discs, polygons, cell-like blobs
and glyph-like strokes, drawn as masks on a pixel grid (no downloads, no fonts).

A *shape* is drawn from a family with :func:`draw_shape` (its random form, fixed for a case)
and rasterised at any frame with :func:`shape_mask` at a centre, a scale (the radius of the
shape's bounding circle, in pixels), an angle and a time ``t`` (cell-like shapes change form
slowly over time; the others are rigid). Every shape fits inside its bounding circle (glyphs
fill 15-35% of it, the other families 30-100%), so the scale sets the size.

Families (:data:`SHAPE_FAMILIES`):

- ``"disc"``: ellipses, aspect ratio 0.65-1;
- ``"polygon"``: regular polygons with 3-6 corners, each corner moved a little;
- ``"cell"``: irregular blobs, a radius ``r(theta)`` made of a few random harmonics whose
  phases drift over time (the outline changes from frame to frame, as a migrating cell's);
- ``"glyph"``: letter-like strokes: one of a small alphabet of polylines (L, T, V, X, Z, N,
  H, A, E, F, K, M, W, Y, 4, 7) with jittered corners, drawn as strokes of random
  thickness. The family kept out of all tuning (:data:`HELD_OUT_SHAPES`).

Shape legend: ``s`` spatial axes ``(h, w)``; ``p`` points of a polyline.

Examples:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> grid = np.indices((32, 32), dtype=np.float32)
    >>> mask = shape_mask(draw_shape("glyph", rng), grid, centre=(16, 16), scale=10, angle=0.3)
    >>> mask.shape, mask.dtype, 40 < int(mask.sum()) < 200
    ((32, 32), dtype('bool'), True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["SHAPE_FAMILIES", "HELD_OUT_SHAPES", "TUNING_SHAPES", "draw_shape", "shape_mask",
           "parse_shapes"]

SHAPE_FAMILIES = ("disc", "polygon", "cell", "glyph")
#: the family kept out of all tuning: report on it, never choose settings by it
HELD_OUT_SHAPES = ("glyph",)
#: the families settings may be chosen on
TUNING_SHAPES = tuple(f for f in SHAPE_FAMILIES if f not in HELD_OUT_SHAPES)

# letter-like polylines in the unit square [-1, 1]^2 (row, col; row grows downwards), one
# list of strokes per glyph, each stroke a list of points
_GLYPHS: dict[str, list[list[tuple[float, float]]]] = {
    "L": [[(-1, -0.6), (1, -0.6), (1, 0.7)]],
    "T": [[(-1, -0.8), (-1, 0.8)], [(-1, 0), (1, 0)]],
    "V": [[(-1, -0.8), (1, 0), (-1, 0.8)]],
    "X": [[(-1, -0.8), (1, 0.8)], [(-1, 0.8), (1, -0.8)]],
    "Z": [[(-1, -0.7), (-1, 0.7), (1, -0.7), (1, 0.7)]],
    "N": [[(1, -0.7), (-1, -0.7), (1, 0.7), (-1, 0.7)]],
    "H": [[(-1, -0.7), (1, -0.7)], [(-1, 0.7), (1, 0.7)], [(0, -0.7), (0, 0.7)]],
    "A": [[(1, -0.8), (-1, 0), (1, 0.8)], [(0.2, -0.4), (0.2, 0.4)]],
    "E": [[(-1, 0.7), (-1, -0.6), (1, -0.6), (1, 0.7)], [(0, -0.6), (0, 0.5)]],
    "F": [[(-1, 0.7), (-1, -0.6), (1, -0.6)], [(0, -0.6), (0, 0.5)]],
    "K": [[(-1, -0.7), (1, -0.7)], [(-1, 0.7), (0, -0.7), (1, 0.7)]],
    "M": [[(1, -0.8), (-1, -0.8), (0.2, 0), (-1, 0.8), (1, 0.8)]],
    "W": [[(-1, -0.8), (1, -0.4), (-0.2, 0), (1, 0.4), (-1, 0.8)]],
    "Y": [[(-1, -0.8), (0, 0), (-1, 0.8)], [(0, 0), (1, 0)]],
    "4": [[(-1, 0.3), (0.3, -0.8), (0.3, 0.8)], [(-1, 0.3), (1, 0.3)]],
    "7": [[(-1, -0.7), (-1, 0.7), (1, -0.3)]],
}


def parse_shapes(value: str | Sequence[str] | None, owner: str = "shapes") -> tuple[str, ...]:
    """Shape families from ``"disc,cell"``, a list, ``"tuning"`` (:data:`TUNING_SHAPES`),
    ``"held-out"`` (:data:`HELD_OUT_SHAPES`) or ``"all"``; ``None`` means ``"tuning"``.

    Examples:
        >>> parse_shapes("held-out"), parse_shapes("cell,disc")
        (('glyph',), ('cell', 'disc'))
    """
    from clstm4d.errors import ConfigError

    groups = {"tuning": TUNING_SHAPES, "held-out": HELD_OUT_SHAPES, "all": SHAPE_FAMILIES}
    if value is None:
        return TUNING_SHAPES
    names = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for name in (str(n).strip() for n in names):
        for family in groups.get(name, (name,)):
            if family not in SHAPE_FAMILIES:
                raise ConfigError(f"{owner}: unknown shape family {family!r}; allowed: "
                                  f"{', '.join(SHAPE_FAMILIES)} or tuning, held-out, all")
            if family not in out:
                out.append(family)
    if not out:
        raise ConfigError(f"{owner}: name at least one shape family, got {value!r}")
    return tuple(out)


def draw_shape(family: str, rng: np.random.Generator) -> dict[str, Any]:
    """The random form of one shape of ``family`` (fixed for a case): a dict that
    :func:`shape_mask` draws."""
    if family == "disc":
        return {"family": family, "aspect": rng.uniform(0.65, 1.0)}
    if family == "polygon":
        n = int(rng.integers(3, 7))
        angles = np.arange(n) * 2 * np.pi / n + rng.uniform(-0.25, 0.25, n) * np.pi / n
        radii = rng.uniform(0.85, 1.0, n)
        return {"family": family, "corners": np.stack([radii * np.sin(angles),
                                                       radii * np.cos(angles)], 1)}
    if family == "cell":
        m = np.arange(2, 6)
        return {"family": family, "orders": m, "amplitude": rng.uniform(0.03, 0.1, m.size),
                "phase": rng.uniform(0, 2 * np.pi, m.size),
                "drift": rng.uniform(-0.25, 0.25, m.size)}
    if family == "glyph":
        letter = list(_GLYPHS)[int(rng.integers(len(_GLYPHS)))]
        strokes = [np.asarray(s, np.float64) + rng.uniform(-0.12, 0.12, (len(s), 2))
                   for s in _GLYPHS[letter]]
        return {"family": family, "letter": letter, "strokes": strokes,
                "width": rng.uniform(0.45, 0.6)}
    raise ValueError(f"family must be one of {SHAPE_FAMILIES}, got {family!r}")


def shape_mask(shape: dict[str, Any], grid: np.ndarray, centre: Sequence[float], scale: float,
               angle: float = 0.0, t: float = 0.0) -> np.ndarray:
    """Rasterise ``shape`` (from :func:`draw_shape`): ``grid`` ``(2, *s)`` pixel coordinates,
    ``centre`` (row, col), ``scale`` the radius of its bounding circle in pixels, ``angle``
    its rotation, ``t`` the time (frames; only cell-like shapes change with it). Returns a
    bool mask ``(*s)``."""
    c, s = np.cos(angle), np.sin(angle)
    dy = (grid[0] - centre[0]) / scale
    dx = (grid[1] - centre[1]) / scale
    u, v = c * dy + s * dx, -s * dy + c * dx  # shape coordinates, bounding circle radius 1
    family = shape["family"]
    if family == "disc":
        return (u / shape["aspect"]) ** 2 + v**2 <= 1.0
    if family == "polygon":
        return _inside_polygon(u, v, shape["corners"])
    if family == "cell":
        theta = np.arctan2(u, v)
        wobble = sum(a * np.cos(m * theta + p + d * t) for m, a, p, d in
                     zip(shape["orders"], shape["amplitude"], shape["phase"], shape["drift"],
                         strict=True))
        return np.hypot(u, v) <= 0.7 * (1 + wobble)
    if family == "glyph":
        dist = np.full(u.shape, np.inf)
        for stroke in shape["strokes"]:
            for a, b in zip(stroke[:-1], stroke[1:], strict=True):
                dist = np.minimum(dist, _segment_distance(u / 0.55, v / 0.55, a, b))
        return dist <= shape["width"] / 2
    raise ValueError(f"unknown shape family {family!r}")


def _inside_polygon(u: np.ndarray, v: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """Points inside the polygon with ``corners`` ``(p, 2)`` (counter-clockwise around 0, star
    shaped): inside every triangle fan sector's outer edge."""
    inside = np.zeros(u.shape, bool)
    for a, b in zip(corners, np.roll(corners, -1, axis=0), strict=True):
        # barycentric test in the triangle (0, a, b)
        det = a[0] * b[1] - a[1] * b[0]
        la = (u * b[1] - v * b[0]) / det
        lb = (a[0] * v - a[1] * u) / det
        inside |= (la >= 0) & (lb >= 0) & (la + lb <= 1)
    return inside


def _segment_distance(u: np.ndarray, v: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of every point ``(u, v)`` to the segment ``a``-``b``."""
    d = b - a
    length2 = float(d @ d) or 1e-12
    w = np.clip(((u - a[0]) * d[0] + (v - a[1]) * d[1]) / length2, 0.0, 1.0)
    return np.hypot(u - a[0] - w * d[0], v - a[1] - w * d[1])
