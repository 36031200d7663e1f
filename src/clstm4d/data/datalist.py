"""Datalists (Medical Segmentation Decathlon style JSON) and case loading.

A datalist is a JSON file::

    {"labels": {"0": "background", "1": "chamber"}, "spatial_dims": 3,
     "training":   [{"image": "imagesTr/p01.nii.gz", "label": "labelsTr/p01.nii.gz"}],
     "validation": [{"image": ["p02/t00.nrrd", "p02/t01.nrrd"],
                     "label": ["p02/t00.seg.nrrd", "p02/t01.seg.nrrd"]}],
     "test":       ["imagesTs/p03.nii.gz"]}

``image`` / ``label`` is one 4D file, a list of per-frame files, a folder of frame files or a
glob pattern (both sorted in natural order); relative paths resolve against the JSON's folder.
An optional ``"time_interval"`` (seconds; top level or per entry) gives the frame interval of
formats that do not store one (per-frame series).

Sparse annotations: an entry may say ``"labelled_frames": [0, 11]`` (0-based): only those
frames of its label are annotations, the others carry no information whatever they hold.
``"label"`` may also be ``{"0": "p01_ed_gt.nii.gz", "11": "p01_es_gt.nii.gz"}``, one 2D/3D
file per annotated frame (ACDC's layout), which implies ``labelled_frames``. A class named
``"ignore"`` in ``labels`` (it must be the highest value) marks voxels that neither the loss
nor the metrics look at, and that the model does not predict.

Shape legend: ``t`` frames, ``c`` channels, ``s`` / ``*s`` spatial axes.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clstm4d._common import atomic_file, check_spatial_dims

from ._common import DataError, Geometry, full_suffix
from .arrays import NUMPY_SUFFIXES
from .dicom import DICOM_SUFFIXES, is_dicom
from .io import FRAME_SUFFIXES, frame_files, natural_key, read_image, read_label

__all__ = ["Case", "CaseData", "Datalist", "load_datalist", "save_datalist", "load_case",
           "datalist_from_folder", "ignore_index", "spread_frames",
           "validate_datalist"]

SECTIONS = ("training", "validation", "test")
#: entry keys written by earlier versions (synthetic data before 0.2), read under today's name
RENAMED_KEYS = {"corrupted": "degraded", "corruption": "degradation",
                "corruption_strength": "degradation_strength"}
# keys of an MSD dataset.json plus ours; anything else at the top level is a mistake
TOP_LEVEL_KEYS = frozenset(SECTIONS) | {
    "labels", "spatial_dims", "name", "description", "reference", "licence", "license",
    "release", "tensorImageSize", "modality", "channels", "numTraining", "numValidation",
    "numTest", "time_interval", "synthetic",
}
#: the name of the class whose voxels carry no annotation (nnU-Net's convention)
IGNORE = "ignore"


def ignore_index(labels: dict[int, str] | None) -> int | None:
    """The value of the class named ``"ignore"`` (any case) in ``labels``, or ``None``.

    Examples:
        >>> ignore_index({0: "background", 1: "cell", 2: "ignore"}), ignore_index({0: "bg"})
        (2, None)
    """
    for k, v in (labels or {}).items():
        if str(v).strip().lower() == IGNORE:
            return int(k)
    return None


def spread_frames(frames: int, n: int) -> list[int]:
    """``n`` frame indices spread over ``frames`` as cardiac ED/ES annotations would be: the
    first frame, then evenly spaced (``n=2``: the first and the middle one).

    Examples:
        >>> spread_frames(16, 2), spread_frames(30, 3), spread_frames(4, 9)
        ([0, 8], [0, 10, 20], [0, 1, 2, 3])
    """
    if n < 1:
        raise ValueError(f"spread_frames: n must be >= 1, got {n}")
    n = min(n, frames)
    return [int(i * frames // n) for i in range(n)]


@dataclass
class Case:
    """One entry of a datalist: where its files are (nothing is read yet).

    Args:
        name: unique case name (from the entry's ``"name"`` or the image file name).
        image: one file or a list of per-frame files (absolute paths).
        label: the same for labels, or a dict ``{frame index: one 2D/3D label file}``
            (annotated frames only), or ``None``.
        meta: the entry's other keys (e.g. ``"degraded": [3, 7]``).
        spatial_dims: 2 or 3 (from the datalist), ``None`` = as stored.
        labels: class index -> name from the datalist, used to check label values.
        labelled_frames: the annotated frames (sorted, 0-based); ``None`` = every frame of
            the label (a label dict sets its keys).
    """

    name: str
    image: Path | list[Path]
    label: Path | list[Path] | dict[int, Path] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    spatial_dims: int | None = None
    labels: dict[int, str] | None = None
    labelled_frames: list[int] | None = None


@dataclass
class CaseData:
    """A loaded case.

    Attributes:
        image: ``(t, c, *s)`` float32.
        label: ``(t, *s)`` int64 or ``None``.
        geometry: of the image (the label's is checked to match).
        meta: the datalist entry's extra keys; synthetic cases carry ``"degraded"``.
        name: the case name.
        labelled: ``(t,)`` bool, the annotated frames: all True for a fully labelled case
            (the default when a label is given), all False without a label. Frames that are
            not annotated hold 0 in ``label`` when loaded by :func:`load_case`; nothing may
            read meaning into them.
    """

    image: np.ndarray
    label: np.ndarray | None
    geometry: Geometry
    meta: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    labelled: np.ndarray | None = None

    def __post_init__(self):
        t = self.image.shape[0]
        if self.labelled is None:
            self.labelled = np.full(t, self.label is not None)
        self.labelled = np.asarray(self.labelled, dtype=bool)
        if self.labelled.shape != (t,):
            raise ValueError(f"CaseData {self.name!r}: labelled must be ({t},) bool (one per "
                             f"frame), got shape {self.labelled.shape}")
        if self.label is None and self.labelled.any():
            raise ValueError(f"CaseData {self.name!r}: labelled frames "
                             f"{np.flatnonzero(self.labelled).tolist()} but no label")


@dataclass
class Datalist:
    """A parsed datalist: sections of :class:`Case`, class names and spatial dims."""

    training: list[Case] = field(default_factory=list)
    validation: list[Case] = field(default_factory=list)
    test: list[Case] = field(default_factory=list)
    labels: dict[int, str] = field(default_factory=dict)
    spatial_dims: int | None = None
    path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Number of classes the model predicts, background included (``max class index + 1``,
        the ``"ignore"`` class left out); 0 if unknown."""
        ignore = self.ignore_index
        classes = [k for k in self.labels if k != ignore]
        return max(classes) + 1 if classes else 0

    @property
    def ignore_index(self) -> int | None:
        """The value of the ``"ignore"`` class, or ``None``."""
        return ignore_index(self.labels)

    def cases(self, *sections: str) -> list[Case]:
        """The cases of the given sections (all sections when none is given)."""
        for s in sections:
            if s not in SECTIONS:
                raise ValueError(f"section must be one of {SECTIONS}, got {s!r}")
        return [c for s in (sections or SECTIONS) for c in getattr(self, s)]


def _resolve(value, root: Path, where: str, key: str, json_path) -> Path | list[Path]:
    if isinstance(value, str):
        if any(ch in value for ch in "*?["):
            matches = sorted((Path(p) for p in glob.glob(str(root / value))), key=natural_key)
            if not matches:
                raise DataError(f"{where}: {key!r} pattern {value!r} matches no file", json_path)
            return matches if len(matches) > 1 else matches[0]
        path = Path(value) if os.path.isabs(value) else root / value
        if path.is_dir():
            try:
                return frame_files(path, label=key != "image")
            except DataError:
                if key == "image" and is_dicom(path):
                    return path  # a DICOM series: read_image reads the folder
                raise DataError(f"{where}: {key!r} folder has no NIfTI/NRRD frame files"
                                f"{' or DICOM files' if key == 'image' else ''}",
                                path) from None
        return path
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return [Path(v) if os.path.isabs(v) else root / v for v in value]
    raise DataError(f"{where}: {key!r} must be a path or a non-empty list of paths, got "
                    f"{type(value).__name__} {value!r:.80}", json_path)


def _parse_labels(raw, json_path) -> dict[int, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise DataError(f"'labels' must be an object like {{\"0\": \"background\"}}, got {raw!r}",
                        json_path)
    out = {}
    for k, v in raw.items():
        if isinstance(v, int) and not str(k).lstrip("-").isdigit():  # {"background": 0}
            k, v = v, k
        try:
            out[int(k)] = str(v)
        except (TypeError, ValueError):
            raise DataError(f"'labels' keys must be class indices, got {k!r}", json_path) from None
    if any(k < 0 for k in out):
        raise DataError(f"'labels' indices must be >= 0, got {sorted(out)}", json_path)
    return dict(sorted(out.items()))


def load_datalist(json_path: str | os.PathLike, require: str | None = None) -> Datalist:
    """Parse a datalist JSON; paths resolve against its folder. Files are not opened.

    Args:
        json_path: the datalist file.
        require: a section that must hold cases (``"training"`` for commands that train or
            plan), or None.

    Raises:
        DataError: the file is missing; ``require`` names a section without cases; unknown
            top-level keys, entries without ``"image"`` (or without ``"label"``
            in ``training``/``validation``), duplicate case names, malformed values (also
            ``labelled_frames``, label dicts and the ``"ignore"`` class). Every problem of the
            file is listed in one error.

    Examples:
        >>> import json, tempfile, pathlib
        >>> d = pathlib.Path((tmpdir := tempfile.TemporaryDirectory()).name)
        >>> _ = (d / "list.json").write_text(json.dumps({"labels": {"0": "bg", "1": "lv"},
        ...     "training": [{"image": "a.nii.gz", "label": "a_seg.nii.gz", "degraded": [2]},
        ...                  {"image": "c.nii.gz", "label": {"0": "c_ed.nii.gz",
        ...                                                  "9": "c_es.nii.gz"}}],
        ...     "test": ["b.nii.gz"]}))
        >>> dl = load_datalist(d / "list.json")
        >>> [c.name for c in dl.cases()], dl.num_classes, dl.training[0].meta
        (['a', 'c', 'b'], 2, {'degraded': [2]})
        >>> dl.training[1].labelled_frames, dl.training[0].labelled_frames
        ([0, 9], None)
        >>> tmpdir.cleanup()
    """
    if require is not None and require not in SECTIONS:
        raise ValueError(f"require must be one of {SECTIONS} or None, got {require!r}")
    datalist, problems = _parse_datalist(json_path)
    if problems:
        raise DataError(f"{len(problems)} problem(s):\n  " + "\n  ".join(problems),
                        datalist.path)
    if require is not None and not getattr(datalist, require):
        raise DataError(f"the datalist has no '{require}' cases", datalist.path)
    return datalist


def _parse_datalist(json_path: str | os.PathLike) -> tuple[Datalist, list[str]]:
    """The datalist without its bad entries, and one message per problem found."""
    json_path = Path(json_path)
    if not json_path.is_file():
        raise DataError("datalist file not found", json_path)
    try:
        raw = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"not valid JSON ({e})", json_path) from e
    if not isinstance(raw, dict):
        raise DataError(f"a datalist must be a JSON object, got {type(raw).__name__}", json_path)
    out, problems = _parse_top_level(raw, json_path)
    seen: dict[str, str] = {}
    for section in SECTIONS:
        entries = raw.get(section, [])
        if not isinstance(entries, list):
            problems.append(f"{section!r} must be a list, got {type(entries).__name__}")
            continue
        for i, entry in enumerate(entries):
            try:
                case = _parse_entry(entry, section, f"{section}[{i}]", raw, out, seen)
            except DataError as e:
                own = e.path in (None, str(json_path))
                problems += e.problem.split("\n") if own else [str(e)]
                continue
            getattr(out, section).append(case)
    return out, problems


def _parse_top_level(raw: dict, json_path: Path) -> tuple[Datalist, list[str]]:
    """The datalist's top-level keys (labels, spatial_dims, time_interval, ...), no cases."""
    problems = []
    unknown = sorted(set(raw) - TOP_LEVEL_KEYS)
    if unknown:
        problems.append(f"unknown top-level keys {unknown}; expected sections {list(SECTIONS)} "
                        f"and optional {sorted(TOP_LEVEL_KEYS - set(SECTIONS))}")
    if not any(s in raw for s in SECTIONS):
        problems.append(f"no section: expected at least one of {list(SECTIONS)}")
    labels = {}
    try:
        labels = _parse_labels(raw.get("labels"), json_path)
    except DataError as e:
        problems.append(e.problem)
    problems += _time_interval_problems(raw)
    problems += _ignore_class_problems(labels)
    spatial_dims = raw.get("spatial_dims")
    try:
        check_spatial_dims(spatial_dims, allow_none=True)
    except ValueError as e:
        problems.append(str(e))
        spatial_dims = None
    out = Datalist(labels=labels, spatial_dims=spatial_dims, path=json_path,
                   meta={k: v for k, v in raw.items() if k not in SECTIONS})
    return out, problems


def _parse_entry(entry: Any, section: str, where: str, raw: dict, out: Datalist,
                 seen: dict[str, str]) -> Case:
    """One entry of a section as a :class:`Case`; :class:`DataError` (its ``problem`` naming
    ``where``, one problem per line) for a bad one. ``seen`` maps the case names so far to
    where they were."""
    json_path, root = out.path, out.path.parent
    if isinstance(entry, str):
        entry = {"image": entry}
    if not isinstance(entry, dict):
        raise DataError(f"{where}: an entry must be an object or a path, got {entry!r:.60}")
    entry = {RENAMED_KEYS.get(k, k): v for k, v in entry.items()}
    if "image" not in entry:
        raise DataError(f"{where}: missing key 'image' (keys: {sorted(entry)})")
    if section != "test" and "label" not in entry:
        raise DataError(f"{where}: missing key 'label' (keys: {sorted(entry)}); {section} "
                        "cases need labels")
    bad = _entry_problems(entry)
    if bad:  # one problem per line
        raise DataError("\n".join(f"{where}: {b}" for b in bad))
    image = _resolve(entry["image"], root, where, "image", json_path)
    name = entry.get("name") or _default_name(image)
    if name in seen:
        raise DataError(f"{where}: duplicate case name {name!r} (also {seen[name]}); add a "
                        "'name' key")
    seen[name] = where
    label, labelled = _parse_annotation(entry, root, f"{where} (case {name!r})", json_path)
    meta = {k: v for k, v in entry.items()
            if k not in ("image", "label", "name", "labelled_frames")}
    if "time_interval" in raw and "time_interval" not in meta:
        meta["time_interval"] = raw["time_interval"]
    return Case(name, image, label, meta, out.spatial_dims, out.labels or None, labelled)


def _ignore_class_problems(labels: dict[int, str]) -> list[str]:
    ignored = [k for k, v in labels.items() if ignore_index({k: v}) is not None]
    if len(ignored) > 1:
        return [f"'labels': one class may be named 'ignore', got {len(ignored)} (values "
                f"{ignored})"]
    if ignored and ignored[0] != max(labels):
        return [f"'labels': the 'ignore' class must have the highest value (nnU-Net's "
                f"convention): expected a value above {max(labels)}, got {ignored[0]}"]
    return []


def _frame_index(value) -> int | None:
    """``value`` as a frame index (an int >= 0, or a string of one), else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _frames_problem(given) -> str | None:
    """What is wrong with a ``labelled_frames`` value, or ``None``."""
    if not isinstance(given, list):
        return f"a {type(given).__name__}, not a list"
    if not given:
        return "empty"
    idx = [_frame_index(f) if not isinstance(f, str) else None for f in given]
    if None in idx:
        return f"{given[idx.index(None)]!r} is not a frame index"
    twice = sorted({f for f in idx if idx.count(f) > 1})
    return f"duplicates {twice}" if twice else None


def _parse_annotation(entry: dict, root: Path, where: str, json_path):
    """``(label, labelled_frames)`` of an entry: the label path(s) or ``{frame: path}``, and
    the sorted annotated frames (``None`` = all)."""
    raw_label = entry.get("label")
    given = entry.get("labelled_frames")
    frames = None
    if given is not None:
        why = _frames_problem(given)
        if why:
            raise DataError(f"{where}: key 'labelled_frames': expected a non-empty list of "
                            f"distinct frame indices (integers >= 0), got {given!r:.80} "
                            f"({why})", json_path)
        frames = sorted(_frame_index(f) for f in given)
        if raw_label is None:
            raise DataError(f"{where}: key 'labelled_frames' {frames} given without a "
                            "'label'", json_path)
    if raw_label is None:
        return None, None
    if not isinstance(raw_label, dict):
        return _resolve(raw_label, root, where, "label", json_path), frames
    if not raw_label:
        raise DataError(f"{where}: key 'label': expected a path, a list of paths or "
                        "{\"<frame index>\": path, ...}, got an empty dict", json_path)
    bad = [k for k in raw_label if _frame_index(k) is None]
    if bad:
        raise DataError(f"{where}: key 'label': the keys of a label dict must be frame "
                        f"indices ('0', '11', ...), got {bad[:10]}", json_path)
    label = {}
    for key, value in sorted(raw_label.items(), key=lambda kv: int(kv[0])):
        if not isinstance(value, str):
            raise DataError(f"{where}: key 'label' frame {key}: expected the path of one 2D/3D "
                            f"label file, got {type(value).__name__} {value!r:.60}", json_path)
        path = _resolve(value, root, where, f"label[{key}]", json_path)
        if isinstance(path, list):
            raise DataError(f"{where}: key 'label' frame {key}: expected one label file, "
                            f"{value!r} names {len(path)}", json_path)
        label[int(key)] = path
    keys = sorted(label)
    if frames is not None and frames != keys:
        raise DataError(f"{where}: key 'labelled_frames' {frames} disagrees with the frames of "
                        f"the 'label' dict {keys}: expected the same frames (or leave "
                        "'labelled_frames' out)", json_path)
    return label, keys


def _positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")


def _entry_problems(entry: dict) -> list[str]:
    """What is wrong with the optional keys of an entry that the tools read."""
    out = []
    name = entry.get("name")
    if name is not None and not (isinstance(name, str) and name.strip()):
        out.append(f"'name' must be a non-empty string, got {name!r:.40}")
    degraded = entry.get("degraded", [])
    if not (isinstance(degraded, list) and all(
            isinstance(f, int) and not isinstance(f, bool) and f >= 0 for f in degraded)):
        out.append(f"'degraded' must be a list of frame indices (integers >= 0), got "
                   f"{degraded!r:.40}")
    return out + _time_interval_problems(entry)


def _time_interval_problems(mapping: dict) -> list[str]:
    """The problem with ``mapping["time_interval"]`` (a datalist or an entry), if any."""
    if "time_interval" not in mapping or _positive_number(mapping["time_interval"]):
        return []
    return [f"'time_interval' must be a number of seconds > 0, got "
            f"{mapping['time_interval']!r:.40}"]


def _default_name(image) -> str:
    first = image[0] if isinstance(image, list) else image
    if isinstance(image, list) and len(image) > 1:
        return first.parent.name
    name = first.name
    suffix = full_suffix(first)
    return name[: -len(suffix)] if suffix else name


def save_datalist(path: str | os.PathLike, *, training: Iterable[dict] = (),
                  validation: Iterable[dict] = (), test: Iterable[dict] = (),
                  labels: dict[int, str] | None = None, spatial_dims: int | None = None,
                  **extra: Any) -> Path:
    """Write a datalist JSON atomically; entry paths (real paths, relative ones to the working
    directory) are stored relative to the JSON's folder where they lie under it.

    Args:
        path: the JSON file.
        training, validation, test: entries ``{"image": ..., "label": ..., **meta}`` with
            paths (str/Path, lists of them, or for ``label`` a dict ``{frame: path}``).
        labels: class index -> name. spatial_dims: 2 or 3.
        extra: other top-level keys (must be among the known MSD keys).
    """
    path = Path(path)
    root = path.parent.resolve()

    def rel(p):
        if isinstance(p, (list, tuple)):
            return [rel(q) for q in p]
        if isinstance(p, dict):  # a label dict {frame: file}
            return {str(k): rel(v) for k, v in p.items()}
        # paths are real paths (relative ones to the working directory, as every caller
        # passes them); the JSON stores them relative to its own folder where possible
        resolved = Path(p).resolve()
        if resolved.is_relative_to(root):
            return resolved.relative_to(root).as_posix()
        return str(resolved)

    doc: dict[str, Any] = {}
    unknown = sorted(set(extra) - TOP_LEVEL_KEYS)
    if unknown:
        raise ValueError(f"save_datalist: unknown top-level keys {unknown}")
    doc.update(extra)
    if labels is not None:
        doc["labels"] = {str(k): v for k, v in sorted(labels.items())}
    if spatial_dims is not None:
        doc["spatial_dims"] = spatial_dims
    for section, entries in (("training", training), ("validation", validation),
                             ("test", test)):
        entries = [{k: (rel(v) if k in ("image", "label") else v) for k, v in e.items()}
                   for e in entries]
        doc[section] = entries
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def load_case(case: Case, spatial_dims: int | None = None,
              labels: dict[int, str] | None = None) -> CaseData:
    """Read a case's image (and label) and check that they fit together.

    Args:
        case: from :func:`load_datalist`.
        spatial_dims: overrides ``case.spatial_dims``.
        labels: overrides ``case.labels`` (class indices allowed in the label).

    Returns:
        :class:`CaseData` with image ``(t, c, *s)`` float32, label ``(t, *s)`` int64 and
        ``labelled (t,)`` bool. Frames that are not annotated (not in ``labelled_frames``, or
        missing from a label dict) are set to 0 in the label, whatever the file holds, so
        that nothing downstream can depend on them.

    Raises:
        DataError: naming the case, the file and the problem (missing or unreadable file,
            NaN/inf, frames of different shape or geometry, image/label mismatch in frames,
            shape or grid, label values outside the declared classes, annotated frames past
            the last frame).
    """
    dims = spatial_dims if spatial_dims is not None else case.spatial_dims
    classes = labels if labels is not None else case.labels
    try:
        image, geometry = read_image(case.image, dims)
        label, labelled = None, None
        if isinstance(case.label, dict):
            label, labelled, sources = _read_frame_labels(case, image, geometry, dims)
        elif case.label is not None:
            label, lgeom = read_label(case.label, dims)
            _check_grid(image, geometry, label, lgeom)
            labelled = _labelled_mask(case.labelled_frames, image.shape[0], "labelled_frames")
            label[~labelled] = 0
            sources = {f: lgeom.sources[min(f, len(lgeom.sources) - 1)]
                       for f in np.flatnonzero(labelled)}
        if label is not None and classes:
            _check_values(label, labelled, sources, classes)
    except DataError as e:
        raise e.with_case(case.name) from None
    if geometry.time_interval is None and case.meta.get("time_interval"):
        # per-frame series store no frame interval: take it from the datalist
        geometry.time_interval = float(case.meta["time_interval"])
        geometry.time_unit = geometry.time_unit or "s"
    return CaseData(image, label, geometry, dict(case.meta), case.name, labelled)


def _labelled_mask(frames: Sequence[int] | None, t: int, key: str) -> np.ndarray:
    """``(t,)`` bool of the annotated frames (all when ``frames`` is None); frames past the
    last one are an error naming ``key``."""
    if frames is None:
        return np.ones(t, bool)
    past = [f for f in frames if f >= t]
    if past:
        raise DataError(f"key {key!r} {list(frames)}: expected frame indices 0-{t - 1} (the "
                        f"image has {t} frames), got {past[:10]}")
    mask = np.zeros(t, bool)
    mask[list(frames)] = True
    return mask


def _read_frame_labels(case: Case, image, geometry, dims):
    """A label dict ``{frame: 2D/3D file}`` -> ``(label (t, *s), labelled (t,), sources)``."""
    t = image.shape[0]
    labelled = _labelled_mask(sorted(case.label), t, "label")
    label = np.zeros((t, *image.shape[2:]), np.int64)
    sources = {}
    for frame, path in sorted(case.label.items()):
        what = f"label of frame {frame}"
        one, lgeom = read_label(path, dims)
        if one.shape[0] != 1:
            raise DataError(f"{what}: expected one 2D/3D label frame, the file holds "
                            f"{one.shape[0]} frames", path)
        _check_grid(image, geometry, one, lgeom, what)
        label[frame] = one[0]
        sources[frame] = str(path)
    return label, labelled, sources


def _check_grid(image, geometry, label, lgeom, what="label"):
    lpath = lgeom.sources[0]
    if what == "label" and label.shape[0] != image.shape[0]:
        raise DataError(f"label has {label.shape[0]} frames, the image "
                        f"({geometry.sources[0]}) has {image.shape[0]}", lpath)
    if label.shape[1:] != image.shape[2:]:
        raise DataError(f"{what} spatial shape {label.shape[1:]} differs from the image's "
                        f"{image.shape[2:]} ({geometry.sources[0]})", lpath)
    if not lgeom.same_grid(geometry):
        raise DataError(f"{what} grid (affine) differs from the image's: "
                        f"{np.round(lgeom.affine[:3], 4).tolist()} vs "
                        f"{np.round(geometry.affine[:3], 4).tolist()}", lpath)


def _check_values(label, labelled, sources, classes):
    """Values of the annotated frames must be declared classes; names the first bad file."""
    for f in np.flatnonzero(labelled):
        bad = [int(v) for v in np.unique(label[f]) if int(v) not in classes]
        if bad:
            others = np.unique(label[labelled])
            bad = [int(v) for v in others if int(v) not in classes]
            raise DataError(f"label values {bad[:10]} are not among the declared classes "
                            f"{sorted(classes)} (first in frame {int(f)})", sources[int(f)])


def validate_datalist(datalist: Datalist | str | os.PathLike,
                      sections: Sequence[str] = SECTIONS, strict: bool = True) -> list[str]:
    """Load every case and report every problem at once.

    Given a path, the problems of the JSON itself (malformed entries, bad
    ``labelled_frames``, label dict keys that are not frame indices, a misplaced
    ``"ignore"`` class) are listed together with those of the cases that could be read.

    Args:
        datalist: a :class:`Datalist` or the JSON path.
        sections: which sections to check.
        strict: raise one :class:`DataError` that lists all problems (else return them).

    Returns:
        One message per problem (empty when all cases load), each naming its case.
    """
    problems = []
    if not isinstance(datalist, Datalist):
        datalist, problems = _parse_datalist(datalist)
    for case in datalist.cases(*sections):
        try:
            load_case(case)
        except DataError as e:
            problems.append(str(e))
    if problems and strict:
        raise DataError(f"{len(problems)} problem(s):\n  " + "\n  ".join(problems),
                        datalist.path)
    return problems


_CASE_SUFFIXES = FRAME_SUFFIXES + (".tif", ".tiff") + DICOM_SUFFIXES + NUMPY_SUFFIXES


def _case_entries(folder: Path) -> dict[str, Path]:
    """Case name -> file (4D file / TIFF) or frame folder, for one images*/labels* folder."""
    out = {}
    for p in sorted(folder.iterdir(), key=natural_key):
        if p.name.startswith("."):
            continue
        suffix = full_suffix(p)
        if p.is_dir():
            out[p.name] = p
        elif suffix in _CASE_SUFFIXES:
            name = p.name[: -len(suffix)]
            for tail in ("_seg", "_label", "_labels", "_mask"):
                if name.endswith(tail) and folder.name.startswith("labels"):
                    name = name[: -len(tail)]
            out[name] = p
    return out


LAYOUTS = ("msd", "acdc")


def datalist_from_folder(folder: str | os.PathLike, out: str | os.PathLike | None = None, *,
                         layout: str = "msd", labels: dict[int, str] | None = None,
                         spatial_dims: int | None = None, validation: float = 0.2,
                         seed: int = 0, time_interval: float | None = None) -> Path:
    """Write a datalist for a dataset folder as it is distributed.

    ``layout="msd"`` (the default), the Medical Segmentation Decathlon's::

        folder/imagesTr/p01.nii.gz      one 4D file per case (NIfTI or TIFF), or
        folder/imagesTr/p02/            a folder of per-frame files (NIfTI or NRRD)
        folder/labelsTr/p01.nii.gz      same case name (``p01_seg.nii.gz`` also matches)
        folder/labelsTr/p02/            frames as .nii.gz or .seg.nrrd
        folder/imagesTs/...             optional unlabelled cases -> "test"

    ``layout="acdc"``: ACDC's ``training/`` and ``testing/`` folders of ``patientNNN/``
    (or a folder of ``patientNNN/`` folders); each case's image is its ``_4d.nii.gz``, its
    label the dict of the ED and ES ground-truth files (frames from ``Info.cfg``), its
    ``"phases"`` entry ``{"ED": i, "ES": j}`` (0-based); patients without ground truth go
    to ``test`` (see :mod:`clstm4d.data.layouts`). Class names default to ACDC's.

    Args:
        folder: the dataset folder.
        out: the JSON to write (default ``folder/datalist.json``).
        layout: ``"msd"`` or ``"acdc"``.
        labels: class index -> name (recommended: label values are then checked).
        spatial_dims: 2 for 2D+t data stored as ``x, y, 1, t`` NIfTI, else as stored.
        validation: fraction of labelled cases put in ``validation`` (seeded shuffle).
        seed: seed of that shuffle.
        time_interval: seconds between frames, for series that do not store it.

    Returns:
        The datalist path. Raises :class:`DataError` listing every image without a label
        (MSD) or every bad patient folder (ACDC).

    Examples:
        >>> import tempfile, pathlib
        >>> from clstm4d.data import write_synthetic_dataset
        >>> root = pathlib.Path((tmpdir := tempfile.TemporaryDirectory()).name)
        >>> _ = write_synthetic_dataset(root, cases=4, frames=4, size=24)
        >>> dl = load_datalist(datalist_from_folder(root, root / "mine.json", spatial_dims=2))
        >>> len(dl.training), len(dl.validation), dl.training[0].image.name
        (3, 1, 'case_000.nii.gz')
        >>> tmpdir.cleanup()
    """
    folder = Path(folder)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not 0 <= validation < 1:
        raise ValueError(f"validation must be a fraction in [0, 1), got {validation}")
    if layout == "acdc":
        from .layouts import acdc_entries

        labelled, test, default_labels = acdc_entries(folder)
        labels = default_labels if labels is None else labels
        spatial_dims = 3 if spatial_dims is None else spatial_dims
    else:
        labelled, test = _msd_entries(folder)
    order = np.random.default_rng(seed).permutation(len(labelled))
    n_val = int(round(len(labelled) * validation))
    if validation > 0 and len(labelled) >= 2:
        n_val = min(max(n_val, 1), len(labelled) - 1)
    val_idx = set(order[:n_val].tolist())
    extra: dict[str, Any] = {}
    if time_interval is not None:
        extra["time_interval"] = time_interval
    return save_datalist(
        out if out is not None else folder / "datalist.json",
        training=[e for i, e in enumerate(labelled) if i not in val_idx],
        validation=[e for i, e in enumerate(labelled) if i in val_idx], test=test,
        labels=labels, spatial_dims=spatial_dims, **extra)


def _msd_entries(folder: Path) -> tuple[list[dict], list[dict]]:
    """MSD layout -> (labelled entries, test entries)."""
    if not (folder / "imagesTr").is_dir() and not (folder / "imagesTs").is_dir():
        raise DataError("expected an 'imagesTr' (and 'labelsTr') or 'imagesTs' folder", folder)
    images = _case_entries(folder / "imagesTr") if (folder / "imagesTr").is_dir() else {}
    segs = _case_entries(folder / "labelsTr") if (folder / "labelsTr").is_dir() else {}
    missing = [name for name in images if name not in segs]
    if missing:
        raise DataError(f"{len(missing)} image(s) without a label in labelsTr: {missing[:20]}",
                        folder / "imagesTr")
    labelled = [{"name": n, "image": images[n], "label": segs[n]} for n in images]
    test = []
    if (folder / "imagesTs").is_dir():
        test = [{"name": n, "image": p} for n, p in _case_entries(folder / "imagesTs").items()]
    return labelled, test
