"""The dataset fingerprint: every training case read once (one at a time) and summarised:
spacing, shape, frames, channels, intensities and class voxels.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clstm4d.data import load_case, load_datalist
from clstm4d.errors import UserError

__all__ = ["CaseFingerprint", "Fingerprint", "fingerprint"]

@dataclass
class CaseFingerprint:
    """One training case, summarised (see :func:`fingerprint`).

    Attributes:
        name, format: the case and its file format. spacing: voxel size per spatial axis
        (arrays' axis order); spacing_stated: whether the file states it. shape: spatial
        size. frames, channels: ``t`` and ``c``. intensity: per channel, statistics of all and
        of the foreground voxels. class_voxels: label value -> voxels over the annotated
        frames (empty without labels). labelled_frames: how many frames are annotated.
    """

    name: str
    format: str
    spacing: list[float]
    spacing_stated: bool
    shape: list[int]
    frames: int
    channels: int
    intensity: dict[str, Any]
    class_voxels: dict[str, int] = field(default_factory=dict)
    labelled_frames: int = 0


@dataclass
class Fingerprint:
    """A dataset's fingerprint: its training cases and what they share.

    Attributes:
        datalist: the datalist's absolute path. spatial_dims, channels: shared by every case.
        labels: class index (as a string) -> name. num_classes: classes the model predicts
        (background included, the ``"ignore"`` class not). cases: one
        :class:`CaseFingerprint` each. validation: the validation cases (spacing, shape,
        frames and channels only: what validation during training holds and predicts).
        notes: what the user should know (e.g. formats that state no spacing).
    """

    datalist: str
    spatial_dims: int
    channels: int
    labels: dict[str, str]
    num_classes: int
    cases: list[CaseFingerprint]
    notes: list[str] = field(default_factory=list)
    validation: list[CaseFingerprint] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable (``fingerprint.json``)."""
        return dataclasses.asdict(self)


def fingerprint(datalist: str | os.PathLike, *, progress: Any = None) -> Fingerprint:
    """Read every training case once, one at a time (never all in memory), and record per
    case: spacing, spatial shape, frames, channels, intensity statistics and class voxel
    counts (labelled frames only, when the data says which are labelled).

    The validation cases are read for their size only (spacing, shape, frames, channels).

    Raises:
        UserError: no training cases, or cases that disagree in channel count or spatial dims
            (naming the cases).
    """
    path = Path(datalist)
    dl = load_datalist(path, require="training")
    cases: list[CaseFingerprint] = []
    notes: list[str] = []
    for i, entry in enumerate(dl.training):
        case = load_case(entry)
        if cases:
            _check_agrees(case, cases[0])
        cases.append(_case_fingerprint(case, notes))
        del case
        if progress is not None:
            progress(i + 1, len(dl.training), cases[-1].name)
    validation = [_case_size(load_case(entry)) for entry in dl.validation]
    return Fingerprint(datalist=str(path.resolve()), spatial_dims=len(cases[0].shape),
                       channels=cases[0].channels,
                       labels={str(k): v for k, v in sorted((dl.labels or {}).items())},
                       num_classes=int(dl.num_classes), cases=cases, notes=notes,
                       validation=validation)


def _case_size(case) -> CaseFingerprint:
    """A validation case: its grid and size only."""
    g = case.geometry
    return CaseFingerprint(name=case.name, format=g.format,
                           spacing=[round(v, 6) for v in g.spacing], spacing_stated=True,
                           shape=list(g.spatial_shape), frames=int(case.image.shape[0]),
                           channels=int(case.image.shape[1]), intensity={})


def _check_agrees(case, first: CaseFingerprint) -> None:
    dims, channels = case.image.ndim - 2, case.image.shape[1]
    if dims != len(first.shape):
        raise UserError(f"case '{case.name}' has {dims} spatial dims, case '{first.name}' has "
                        f"{len(first.shape)}: all training cases must agree")
    if channels != first.channels:
        raise UserError(f"case '{case.name}' has {channels} channels per frame, case "
                        f"'{first.name}' has {first.channels}: all training cases must agree")


def _case_fingerprint(case, notes: list[str]) -> CaseFingerprint:
    image, label, g = case.image, case.label, case.geometry
    stated = g.space_unit is not None or g.format in ("nifti", "nifti-series")
    if not stated:
        notes.append(f"case '{case.name}' ({g.format}): the file states no voxel size; "
                     f"{list(g.spacing)} (1 per voxel) is used")
    out = CaseFingerprint(
        name=case.name, format=g.format, spacing=[round(v, 6) for v in g.spacing],
        spacing_stated=bool(stated), shape=list(g.spatial_shape), frames=int(image.shape[0]),
        channels=int(image.shape[1]), intensity=_intensity(image, label))
    if label is not None:
        frames = getattr(case, "labelled", None)
        lab = label if frames is None else label[np.asarray(frames, bool)]
        values, counts = np.unique(lab, return_counts=True)
        out.class_voxels = {str(int(v)): int(n) for v, n in zip(values, counts, strict=True)}
        out.labelled_frames = int(lab.shape[0])
    return out


def _intensity(image: np.ndarray, label: np.ndarray | None) -> dict[str, Any]:
    """Per channel: mean, std and 0.5/50/99.5 percentiles of all voxels and of the
    foreground (label > 0) voxels."""
    out = []
    for c in range(image.shape[1]):
        values = image[:, c]
        stats = {"all": _stats(values)}
        if label is not None and (label > 0).any():
            stats["foreground"] = _stats(values[label > 0])
        out.append(stats)
    return {"channels": out}


def _stats(v: np.ndarray) -> dict[str, float]:
    v = np.asarray(v, np.float64).ravel()
    p = np.percentile(v, [0.5, 50, 99.5])
    return {"mean": float(v.mean()), "std": float(v.std()), "p00_5": float(p[0]),
            "p50": float(p[1]), "p99_5": float(p[2])}
