"""Synthetic 4D data: a beating ellipsoidal chamber and drifting blobs, with corrupted frames.

Every case is a 2D+t or 3D+t sequence (1D+t works too) drawn deterministically from a seed:

- class 1, the *chamber*: an ellipse/ellipsoid whose semi-axes beat sinusoidally (one beat per
  ~1-1.6 sequences), slowly rotating and swaying;
- class 2, *blobs*: small discs/spheres that drift in a straight line at constant speed and
  pulse slightly, never touching the chamber or each other;
- the image: bright objects on a dim textured background, multiplied by a smooth bias field
  and a slowly drifting global gain, plus Gaussian noise;
- *corrupted frames* (never frame 0, never two in a row): ``"dropout"`` (the signal of the frame
  is gone: background and noise only) or ``"occlusion"`` (a box of object-like intensity hides
  every object and a random margin around it). Labels stay exact on every frame, so on a
  corrupted frame only the earlier frames tell where the objects are: a model with temporal
  memory can segment them, a per-frame model cannot. ``meta["corrupted"]`` lists those frames.

Shape legend: ``t`` frames, ``c`` channels, ``s`` / ``*s`` spatial axes, ``d`` spatial dims.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._common import Geometry
from .datalist import CaseData, save_datalist
from .io import write_image, write_label

__all__ = ["CLASS_NAMES", "make_synthetic_case", "write_synthetic_dataset",
           "add_synth_arguments", "synth_options", "DEFAULT_SIZE", "design_check"]

logger = logging.getLogger(__name__)

CLASS_NAMES = {0: "background", 1: "chamber", 2: "blob"}
DEFAULT_SIZE = {1: 128, 2: 64, 3: 32}
CORRUPTIONS = ("dropout", "occlusion")
FORMATS = {"nifti": (".nii.gz", False), "nifti-series": (".nii.gz", True),
           "nrrd-series": (".nrrd", True), "tiff": (".tif", False)}


def _shape(size, spatial_dims) -> tuple[int, ...]:
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
    if size is None:
        size = DEFAULT_SIZE[spatial_dims]
    shape = (int(size),) * spatial_dims if np.ndim(size) == 0 else tuple(int(n) for n in size)
    if len(shape) != spatial_dims or min(shape) < 16:
        raise ValueError(f"size must be an int >= 16 or {spatial_dims} such ints, got {size!r}")
    return shape


def _rotation(d: int, basis: np.ndarray, angle: float) -> np.ndarray:
    """``basis @ G(angle)``: G rotates the first two coordinates (identity in 1D)."""
    if d == 1:
        return np.ones((1, 1))
    g = np.eye(d)
    c, s = np.cos(angle), np.sin(angle)
    g[:2, :2] = [[c, -s], [s, c]]
    return basis @ g


def _smooth_field(rng, grid, shape, amplitude, waves=4):
    """A smooth random field (sum of low-frequency plane waves over the extent ``shape`` of the
    coordinates ``grid`` (d, *voxels)), values in about +-amplitude."""
    field = np.zeros(grid.shape[1:], np.float32)
    for _ in range(waves):
        freq = rng.integers(-2, 3, len(shape))
        if not freq.any():
            freq[0] = 1
        k = 2 * np.pi * freq / np.asarray(shape)
        field += np.cos(np.tensordot(k, grid, axes=1) + rng.uniform(0, 2 * np.pi))
    return (amplitude / np.sqrt(waves / 2)) * field


def _pick_corrupted(rng, frames: int, count: int) -> list[int]:
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
                        blobs: int = 2, corrupted: int | Sequence[int] | None = None,
                        corruption: Sequence[str] = CORRUPTIONS, noise: float = 0.08,
                        drift: float = 0.1, spacing: float | Sequence[float] = 1.0,
                        time_interval: float = 0.05,
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
        corrupted: number of corrupted frames (default ``round(t / 4)``, at most
            ``(t - 1 + 1) // 2``) or the explicit frame indices.
        corruption: the kinds to draw from: ``"dropout"``, ``"occlusion"``.
        noise: standard deviation of the Gaussian noise (object contrast is about 0.5-0.9).
        drift: relative amplitude of the slow global intensity drift.
        spacing: voxel size (mm), one value or one per axis (arrays' axis order), e.g.
            ``(1, 1, 4)`` for thick slices along the last axis. time_interval: seconds between
            frames.
        name: case name (default ``synth_<seed>``).

    Returns:
        :class:`CaseData` with image ``(t, 1, *s)`` float32, label ``(t, *s)`` int64 (classes
        :data:`CLASS_NAMES`), a NIfTI :class:`Geometry` and ``meta`` with ``"corrupted"``
        (sorted frame indices) and ``"corruption"`` (their kinds, same order).

    Examples:
        >>> case = make_synthetic_case(seed=1, frames=8, size=32, spatial_dims=2)
        >>> case.image.shape, case.label.shape, case.meta["corrupted"]
        ((8, 1, 32, 32), (8, 32, 32), [1, 5])
        >>> bool((make_synthetic_case(seed=1, frames=8, size=32).image == case.image).all())
        True
    """
    shape = _shape(size, spatial_dims)
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if blobs < 0:
        raise ValueError(f"blobs must be >= 0, got {blobs}")
    bad = [k for k in corruption if k not in CORRUPTIONS]
    if bad or not corruption:
        raise ValueError(f"corruption must be a non-empty subset of {CORRUPTIONS}, got "
                         f"{tuple(corruption)}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    step = _spacing(spacing, spatial_dims)
    voxels = tuple(max(1, int(round(n / h))) for n, h in zip(shape, step, strict=True))
    if min(voxels) < 4:
        raise ValueError(f"size {shape} at spacing {step} gives {voxels} voxels; every axis "
                         "needs at least 4 (use a larger size or a finer spacing)")
    rng = np.random.default_rng(seed)
    d = spatial_dims
    length = float(min(shape))
    # where the voxel centres lie in the scene: the voxels of a coarse axis tile the same extent
    # (at spacing 1, voxel i sits at i)
    centres = [((np.arange(v) + 0.5) * h - 0.5).astype(np.float32)
               for v, h in zip(voxels, step, strict=True)]
    grid = np.stack(np.meshgrid(*centres, indexing="ij"))  # (d, *s)
    t = np.arange(frames, dtype=np.float64)

    # chamber: beating semi-axes, slow rotation, small sway of the centre
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

    # blobs: straight drift at constant speed, slight pulsing, kept apart from everything
    tracks = []  # (positions (t, d), radii (t,))
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

    label = np.zeros((frames, *voxels), np.int64)
    for i in range(frames):
        rot = _rotation(d, basis, angle0 + omega * i)
        offset = grid - centers[i].reshape((d,) + (1,) * d)  # (d, *s)
        local = np.tensordot(rot.T, offset, axes=1)  # coordinates along the semi-axes
        inside = (np.square(local / semi[i].reshape((d,) + (1,) * d))).sum(0) <= 1
        label[i][inside] = 1
        for pos, radii in tracks:
            offset = grid - pos[i].reshape((d,) + (1,) * d)
            label[i][np.square(offset).sum(0) <= radii[i] ** 2] = 2

    # image formation
    background = 0.2 + _smooth_field(rng, grid, shape, 0.05)
    bias = 1 + _smooth_field(rng, grid, shape, 0.1)
    levels = np.array([0.0, rng.uniform(0.9, 1.1), rng.uniform(0.65, 0.8)], np.float32)
    gain = 1 + drift * np.sin(2 * np.pi * t / (rng.uniform(2, 4) * max(frames, 8))
                              + rng.uniform(0, 2 * np.pi))
    if corrupted is None:
        count = min(int(round(frames / 4)), frames // 2)
        bad_frames = _pick_corrupted(rng, frames, count)
    elif np.ndim(corrupted) == 0:
        if not 0 <= int(corrupted) <= frames // 2:
            raise ValueError(f"corrupted: at most {frames // 2} non-adjacent frames after frame 0 "
                             f"fit in {frames} frames, got {corrupted}")
        bad_frames = _pick_corrupted(rng, frames, int(corrupted))
    else:
        bad_frames = sorted({int(f) for f in corrupted})
        if any(not 0 <= f < frames for f in bad_frames):
            raise ValueError(f"corrupted: frame indices must be in [0, {frames}), got {corrupted}")
    kinds = [str(corruption[rng.integers(len(corruption))]) for _ in bad_frames]

    image = np.empty((frames, 1, *voxels), np.float32)
    for i in range(frames):
        frame = background + np.where(label[i] > 0, levels[label[i]] - background, 0)
        if i in bad_frames:
            kind = kinds[bad_frames.index(i)]
            if kind == "dropout":
                frame = 0.7 * background
            else:
                frame = frame.copy()
                box = _occluder(rng, label[i], voxels, length / np.asarray(step))
                frame[box] = rng.uniform(0.85, 1.05)
        frame = gain[i] * bias * frame + noise * rng.standard_normal(voxels, dtype=np.float32)
        image[i, 0] = frame
    geometry = Geometry.default("nifti", voxels, frames, spacing=step,
                                origin=[(h - 1) / 2 for h in step], time_interval=time_interval)
    meta = {"corrupted": bad_frames, "corruption": kinds}
    return CaseData(image, label, geometry, meta, name or f"synth_{_seed_name(seed)}")


def _spacing(spacing, spatial_dims: int) -> tuple[float, ...]:
    values = (spacing,) * spatial_dims if np.ndim(spacing) == 0 else tuple(spacing)
    if len(values) != spatial_dims or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be a positive number or {spatial_dims} of them (one "
                         f"per spatial axis), got {spacing!r}")
    return tuple(float(v) for v in values)


def _seed_name(seed) -> str:
    return "_".join(str(s) for s in seed) if np.ndim(seed) else str(seed)


def _occluder(rng, label, shape, length):
    """Index tuple of a box that covers all foreground of ``label`` with random margins
    (``length``: the scene's size in voxels, one value or one per axis)."""
    length = np.broadcast_to(np.asarray(length, np.float64), (len(shape),))
    fg = np.argwhere(label > 0)
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


def write_synthetic_dataset(out: str | os.PathLike, cases: int = 16, frames: int = 10,
                            size: int | Sequence[int] | None = None, spatial_dims: int = 2,
                            seed: int = 0, *, format: str = "nifti", validation: float = 0.25,
                            test: int = 0, **case_kwargs: Any) -> Path:
    """Write a synthetic dataset as files plus a datalist JSON; returns the datalist path.

    Layout (``format="nifti"``): ``out/imagesTr/case_000.nii.gz``,
    ``out/labelsTr/case_000.nii.gz`` (test cases under ``imagesTs``/``labelsTs``) and
    ``out/datalist.json`` with ``"labels"``, ``"spatial_dims"`` and per-entry ``"corrupted"``.
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
        case_kwargs: passed to :func:`make_synthetic_case` (``blobs``, ``noise``, ...).

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
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {format!r}")
    if cases < 1 or test < 0:
        raise ValueError(f"cases must be >= 1 and test >= 0, got cases={cases}, test={test}")
    if not 0 <= validation < 1:
        raise ValueError(f"validation must be a fraction in [0, 1), got {validation}")
    out = Path(out)
    n_val = int(round(cases * validation))
    if validation > 0 and cases >= 2:
        n_val = min(max(n_val, 1), cases - 1)
    suffix, series = FORMATS[format]
    sections: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    for i in range(cases + test):
        name = f"case_{i:03d}"
        case = make_synthetic_case((seed, i), frames, size, spatial_dims, name=name,
                                   **case_kwargs)
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
                 "label": label_paths if series else label_paths[0],
                 "corrupted": case.meta["corrupted"], "corruption": case.meta["corruption"]}
        section = "test" if i >= cases else ("validation" if i >= cases - n_val else "training")
        sections[section].append(entry)
    settings = {"cases": cases, "frames": frames, "size": list(case.geometry.spatial_shape),
                "spatial_dims": spatial_dims, "seed": seed, "format": format,
                "validation": validation, "test": test, **case_kwargs}
    return save_datalist(
        out / "datalist.json", **sections, labels=CLASS_NAMES, spatial_dims=spatial_dims,
        name="clstm4d-synthetic",
        description="Synthetic time-resolved data: a beating chamber (1) and drifting blobs "
                    "(2); 'corrupted' lists frames with signal dropout or occlusion.",
        tensorImageSize=f"{spatial_dims + 1}D", modality={"0": "synthetic"},
        time_interval=case.geometry.time_interval, synthetic=settings,
        numTraining=len(sections["training"]) + len(sections["validation"]),
        numTest=len(sections["test"]),
    )


def add_synth_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``clstm4d synth`` to ``parser`` (see :func:`synth_options`).

    Examples:
        >>> p = add_synth_arguments(argparse.ArgumentParser())
        >>> opts = synth_options(p.parse_args(["--out", "d", "--dims", "3"]))
        >>> opts["spatial_dims"], opts["size"], opts["format"]
        (3, None, 'nifti')
    """
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--cases", type=int, default=16, help="labelled cases (default 16)")
    parser.add_argument("--frames", type=int, default=10, help="frames per case (default 10)")
    parser.add_argument("--size", type=int, default=None,
                        help="spatial size per axis (default 64 in 2D, 32 in 3D)")
    parser.add_argument("--dims", type=int, default=2, choices=(1, 2, 3),
                        help="spatial dimensions (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--format", default="nifti", choices=sorted(FORMATS),
                        help="file format (default nifti: one 4D .nii.gz per case)")
    parser.add_argument("--validation", type=float, default=0.25,
                        help="fraction of cases for validation (default 0.25)")
    parser.add_argument("--test", type=int, default=0, help="extra test cases (default 0)")
    parser.add_argument("--noise", type=float, default=0.08, help="noise std (default 0.08)")
    parser.add_argument("--blobs", type=int, default=2, help="drifting blobs per case (default 2)")
    parser.add_argument("--corrupted", type=int, default=None,
                        help="corrupted frames per case (default: about a quarter of the frames)")
    parser.add_argument("--spacing", type=_spacing_arg, default=None, metavar="S[,S,S]",
                        help="voxel size per spatial axis in the arrays' axis order, e.g. "
                             "1,1,4 for slices 4x thicker than the in-plane pixels (the scene "
                             "keeps its extent --size, so that axis gets size/4 voxels; "
                             "default 1)")
    return parser


def _spacing_arg(text: str) -> float | tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, e.g. 1,1,4; "
                                         f"got {text!r}") from None
    return values[0] if len(values) == 1 else values


def synth_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :func:`write_synthetic_dataset` from :func:`add_synth_arguments`."""
    return {"out": args.out, "cases": args.cases, "frames": args.frames, "size": args.size,
            "spatial_dims": args.dims, "seed": args.seed, "format": args.format,
            "validation": args.validation, "test": args.test, "noise": args.noise,
            "blobs": args.blobs, "corrupted": args.corrupted,
            **({} if getattr(args, "spacing", None) is None else {"spacing": args.spacing})}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * (a & b).sum() / total)


def design_check(cases: int = 8, frames: int = 10, size: int | Sequence[int] | None = None,
                 spatial_dims: int = 2, seed: int = 0, **case_kwargs: Any) -> dict[str, float]:
    """Measure, without a network, how much a corrupted frame needs the earlier frames.

    Foreground Dice (all classes > 0 together), averaged over frames of ``cases`` cases drawn
    as :func:`write_synthetic_dataset` draws them:

    - ``clean_threshold``: the best global intensity threshold of each clean frame (an oracle
      per-frame rule: the threshold is chosen knowing the truth);
    - ``corrupted_threshold``: the same on corrupted frames;
    - ``corrupted_copy_previous``: copying the previous frame's mask to the corrupted frame
      (what remembering the sequence gives, without any extrapolation).

    Examples:
        >>> r = design_check(cases=2, frames=8, size=32)
        >>> r["corrupted_copy_previous"] > 0.7 > r["corrupted_threshold"]
        True
    """
    clean, corrupt_thr, corrupt_copy = [], [], []
    for i in range(cases):
        case = make_synthetic_case((seed, i), frames, size, spatial_dims, **case_kwargs)
        fg = case.label > 0
        bad = case.meta["corrupted"]
        for t in range(frames):
            image = case.image[t, 0]
            levels = np.quantile(image, np.linspace(0.0, 0.995, 100))
            best = max(_dice(image > q, fg[t]) for q in levels)
            if t in bad:
                corrupt_thr.append(best)
                corrupt_copy.append(_dice(fg[t - 1], fg[t]))
            else:
                clean.append(best)
    return {"clean_threshold": float(np.mean(clean)),
            "corrupted_threshold": float(np.mean(corrupt_thr)) if corrupt_thr else float("nan"),
            "corrupted_copy_previous": (float(np.mean(corrupt_copy)) if corrupt_copy
                                        else float("nan")),
            "corrupted_frames": len(corrupt_thr), "clean_frames": len(clean)}
