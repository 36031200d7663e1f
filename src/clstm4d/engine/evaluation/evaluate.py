"""Per-frame, per-class evaluation of a segmented sequence: Dice, HD95, temporal consistency.

Shape legend: ``t`` frames, ``k`` classes (0 = background), ``*s`` spatial axes.

Examples:
    >>> import numpy as np
    >>> label = np.zeros((4, 8, 8), np.int64); label[:, 2:6, 2:6] = 1
    >>> pred = label.copy(); pred[1] = 0          # the prediction misses frame 1
    >>> r = evaluate_sequence(pred, label, num_classes=2, degraded=[1])
    >>> round(r.dice, 3), r.dice_degraded, r.dice_clean
    (0.75, 0.0, 1.0)
    >>> [row["dice"] for row in r.rows]
    [1.0, 0.0, 1.0, 1.0]
    >>> r = evaluate_sequence(pred, label, num_classes=2, frames=[0, 3])  # annotated frames
    >>> r.frames, r.dice
    ([0, 3], 1.0)
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clstm4d._common import atomic_write_text, json_finite, nanmean
from clstm4d.data import load_case, load_datalist, read_label
from clstm4d.errors import UserError

from .inputs import class_set, label_path, parse_frames, same_grid_or_resample
from .metrics import dice_per_frame, drop_ignored, hd95_per_frame, temporal_consistency
from .plots import plot_dice_per_frame, plot_volumes

__all__ = ["EvaluationResult", "dice_by_degradation", "evaluate_files", "evaluate_sequence",
           "parse_frames", "write_evaluation", "write_frames_csv"]


@dataclass
class EvaluationResult:
    """What :func:`evaluate_sequence` measured on one sequence.

    Attributes:
        rows: one dict per scored frame (``frame``, ``degraded``, ``dice`` (mean over the
            foreground classes present in the prediction or the label of that frame; NaN
            when none is), ``dice_<class>`` (NaN where the class is absent from both),
            ``hd95_<class>`` (unless HD95 was skipped), ``volume_<class>``,
            ``label_volume_<class>``, and ``degradation`` when the kinds were given): the rows
            of ``frames.csv``. Distances are in ``unit``, volumes in ``unit`` cubed.
        frames: the scored frame indices, in order.
        dice, dice_degraded, dice_clean: mean per-frame Dice over all scored frames, over the
            degraded ones and over the others (NaN where there are none).
        hd95: mean HD95 over frames and classes (NaN where undefined or not computed).
        temporal: how smoothly the segmented volume changes, mean over the classes (see
            :func:`~clstm4d.engine.evaluation.metrics.temporal_consistency`).
        per_class: class name -> ``{"dice", "hd95", <temporal measures>}``.
        class_names: class index -> name (foreground classes).
        case: the datalist case evaluated (:func:`evaluate_files`), if any.
        degraded: the frames reported as degraded.
        absent: class name -> the scored frames where the class is in neither the prediction
            nor the label: left out of every Dice mean there (a class absent from both is
            no evidence of a good segmentation).
        unit: the unit of distances (``"mm"``, ``"micron"``; ``"voxel"`` without a spacing).
        hd95_computed: False when HD95 was skipped (then no HD95 column or value exists).
    """

    rows: list[dict[str, Any]]
    frames: list[int]
    dice: float
    dice_degraded: float
    dice_clean: float
    hd95: float
    temporal: dict[str, float]
    per_class: dict[str, dict[str, float]]
    class_names: dict[int, str]
    case: str | None = None
    degraded: list[int] = field(default_factory=list)
    absent: dict[str, list[int]] = field(default_factory=dict)
    unit: str = "voxel"
    hd95_computed: bool = True

    @property
    def num_classes(self) -> int:
        """Classes including background."""
        return len(self.class_names) + 1

    def units(self) -> dict[str, str]:
        """The unit of every column that has one (``hd95_<class>``, ``volume_<class>``,
        ``label_volume_<class>``)."""
        out = {}
        for name in self.class_names.values():
            if self.hd95_computed:
                out[f"hd95_{name}"] = self.unit
            out[f"volume_{name}"] = out[f"label_volume_{name}"] = f"{self.unit}^3"
        return out

    def summary(self) -> dict[str, Any]:
        """One flat dict (``summary.json``): ``frames`` (how many were scored),
        ``scored_frames``, ``dice``, ``dice_degraded``, ``dice_clean``, ``hd95`` (when
        computed), the temporal measures, per class ``dice_<class>``, ``hd95_<class>``,
        ``<measure>_<class>``, and ``absent_classes`` (class -> frames where it is in neither
        file, left out of the Dice means) and ``units``."""
        out: dict[str, Any] = {"frames": len(self.frames), "scored_frames": self.frames,
                               "dice": self.dice, "dice_degraded": self.dice_degraded,
                               "dice_clean": self.dice_clean}
        if self.hd95_computed:
            out["hd95"] = self.hd95
        for name, values in self.per_class.items():
            out[f"dice_{name}"] = values["dice"]
            if self.hd95_computed:
                out[f"hd95_{name}"] = values["hd95"]
        out.update(self.temporal)
        for name, values in self.per_class.items():
            out.update({f"{k}_{name}": v for k, v in values.items() if k in self.temporal})
        out["absent_classes"] = {k: v for k, v in self.absent.items() if v}
        out["units"] = {"hd95": self.unit, "volume": f"{self.unit}^3"}
        if not self.hd95_computed:
            del out["units"]["hd95"]
        return out

    def notes(self) -> list[str]:
        """Lines that say what the means left out (classes absent from both files)."""
        lines = []
        for name, frames in self.absent.items():
            if len(frames) == len(self.frames):
                lines.append(f"class '{name}' is in neither the prediction nor the label: left "
                             "out of the Dice means")
            elif frames:
                lines.append(f"class '{name}' is in neither the prediction nor the label in "
                             f"{len(frames)} of {len(self.frames)} frames: left out of those "
                             "frames' Dice")
        return lines


def evaluate_sequence(
    pred,
    label,
    num_classes: int,
    *,
    spacing: Sequence[float] | None = None,
    degraded: Sequence[int] = (),
    class_names: dict[int, str] | None = None,
    hd95: bool = True,
    degradation: Sequence[str] = (),
    frames: Sequence[int] | None = None,
    ignore_index: int | None = None,
    unit: str | None = None,
) -> EvaluationResult:
    """Compare a predicted label sequence with the truth, frame by frame.

    Args:
        pred, label: ``(t, *s)`` integer class maps.
        num_classes: ``k`` including background (the ``"ignore"`` class not counted).
        spacing: voxel size per spatial axis, so HD95 comes in physical units.
        degraded: frames to report separately (``dice_degraded`` / ``dice_clean``).
        class_names: index -> name for the per-class columns (default ``class1``, ...).
        hd95: compute the 95th-percentile Hausdorff distance (the slowest part).
        degradation: the kind of each frame in ``degraded`` (same order, e.g. a synthetic
            case's ``meta["degradation"]``); rows then carry it (``""`` on clean frames) and
            :func:`dice_by_degradation` groups them.
        frames: score only these frames (e.g. the annotated ones); ``None`` = all.
        ignore_index: label value whose voxels are left out of every measure.
        unit: the unit of ``spacing`` (the geometry's ``space_unit``; ``None``: unknown, named
            ``"spacing unit"``); distances are in it, volumes in it cubed.

    Returns:
        An :class:`EvaluationResult`.
    """
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape:
        raise ValueError(
            f"prediction {pred.shape} and label {label.shape} must have the same shape (t, *s)"
        )
    if degradation and len(degradation) != len(degraded):
        raise ValueError(f"degradation needs one kind per degraded frame: {len(degraded)} "
                         f"frames, {len(degradation)} kinds")
    scored = list(range(pred.shape[0])) if frames is None else parse_frames(
        frames, pred.shape[0])
    pred, label = drop_ignored(pred[scored], label[scored], ignore_index)  # (scored, *s)
    names = {k: (class_names or {}).get(k, f"class{k}") for k in range(1, num_classes)}
    dice = dice_per_frame(pred, label, num_classes).numpy()  # (scored, k-1)
    present = np.stack([((pred == k) | (label == k)).reshape(len(scored), -1).any(1)
                        for k in names], 1)  # (scored, k-1)
    dice = np.where(present, dice, np.nan)  # absent from both: no evidence, left out
    hd = (hd95_per_frame(pred, label, num_classes, spacing).numpy() if hd95
          else np.full_like(dice, np.nan))
    kinds = dict(zip((int(f) for f in degraded), degradation, strict=False))
    rows = _rows(pred, label, scored, dice, hd if hd95 else None, names, spacing,
                 {int(f) for f in degraded}, kinds if degradation else None)
    per_frame = np.array([r["dice"] for r in rows], float)
    is_d = np.array([r["degraded"] for r in rows], bool)
    temporal = temporal_consistency(pred, label, num_classes)
    per_class = {name: {"dice": nanmean(dice[:, j]), "hd95": nanmean(hd[:, j]),
                        **{key: values[j] for key, values in temporal.items()}}
                 for j, name in enumerate(names.values())}
    return EvaluationResult(
        rows=rows, frames=scored, dice=nanmean(per_frame),
        dice_degraded=nanmean(per_frame[is_d]), dice_clean=nanmean(per_frame[~is_d]),
        hd95=nanmean(hd), temporal={key: nanmean(v) for key, v in temporal.items()},
        per_class=per_class, class_names=names, degraded=sorted({int(f) for f in degraded}),
        absent={name: [scored[i] for i in np.flatnonzero(~present[:, j])]
                for j, name in enumerate(names.values())},
        unit=(unit or "spacing unit") if spacing is not None else "voxel",
        hd95_computed=hd95)


def _rows(pred, label, scored, dice, hd, names, spacing, degraded, kinds):
    """One row per scored frame (see :class:`EvaluationResult`)."""
    voxel = float(np.prod(spacing)) if spacing is not None else 1.0
    rows = []
    for i, f in enumerate(scored):
        row: dict[str, Any] = {"frame": f, "degraded": f in degraded,
                               "dice": nanmean(dice[i])}
        if kinds is not None:
            row["degradation"] = str(kinds.get(f, ""))
        for j, (k, name) in enumerate(names.items()):
            row[f"dice_{name}"] = float(dice[i, j])
            if hd is not None:
                row[f"hd95_{name}"] = float(hd[i, j])
            row[f"volume_{name}"] = float((pred[i] == k).sum()) * voxel
            row[f"label_volume_{name}"] = float((label[i] == k).sum()) * voxel
        rows.append(row)
    return rows


def evaluate_files(pred: str | Path | Sequence[str | Path],
                   label: str | Path | Sequence[str | Path] | None = None, *,
                   datalist: str | Path | None = None, case: str | None = None,
                   frames: str | Sequence[int] | None = None,
                   degraded: str | Sequence[int] | None = None,
                   num_classes: int | None = None, hd95: bool = True,
                   checkpoint: str | Path | None = None,
                   resample_to_label: bool = False) -> EvaluationResult:
    """Read a prediction and its reference and evaluate them (what ``clstm4d evaluate`` does).

    The reference is either ``label`` (file(s)) or the entry ``case`` of ``datalist``; from a
    datalist entry come its annotated frames (the frames scored unless ``frames`` is given,
    which must then be annotated ones), its degraded frames, the class names, the number of
    classes and the ``"ignore"`` class. The class set (:func:`~.inputs.class_set`) is
    ``num_classes``, else the datalist's or the ``checkpoint``'s labels, else what the files
    hold; a declared set refuses a value outside it. The prediction must lie on the
    reference's grid, or is resampled onto it (nearest neighbour) with ``resample_to_label``.

    Returns:
        :func:`evaluate_sequence`'s result, with ``case`` set.
    """
    paths = [pred] if isinstance(pred, (str, Path)) else list(pred)
    for f in paths + ([label] if isinstance(label, (str, Path)) else list(label or [])):
        if not Path(f).exists():
            raise UserError(f"file not found: {f}")
    if (label is None) == (datalist is None):
        raise UserError("give the reference as --label files or as --datalist (with --case)")
    ref = _reference(label, datalist, case, checkpoint)
    prediction, pred_geometry = read_label(paths[0] if len(paths) == 1 else paths, ref["dims"])
    prediction = same_grid_or_resample(prediction, pred_geometry, ref["geometry"],
                                       pred_path=label_path(paths), ref_path=ref["path"],
                                       resample=resample_to_label)
    reference = ref["label"]
    classes = class_set(num_classes=num_classes, labels=ref["labels"],
                        labels_source=ref["labels_source"], ignore_index=ref["ignore"],
                        values=(prediction, reference))
    classes.check(prediction, label_path(paths), "prediction")
    classes.check(reference, ref["path"], "reference")
    t = reference.shape[0]
    scored = None if frames is None else parse_frames(frames, t)
    if ref["annotated"] is not None:
        unannotated = [f for f in (scored or []) if f not in ref["annotated"]]
        if unannotated:
            raise UserError(f"--frames {unannotated}: not annotated in case '{ref['case']}' "
                            f"(annotated frames: {ref['annotated']})")
        scored = scored or ref["annotated"]
    if degraded is None:
        degraded = ref["degraded"]
    if isinstance(degraded, str):
        degraded = parse_frames(degraded, t, "degraded") if degraded.strip() else []
    geometry = ref["geometry"]
    result = evaluate_sequence(prediction, reference, classes.num_classes,
                               spacing=geometry.spacing, degraded=list(degraded or []),
                               class_names=classes.names, hd95=hd95, frames=scored,
                               ignore_index=ref["ignore"], unit=geometry.space_unit)
    return dataclasses.replace(result, case=ref["case"])


def _reference(label, datalist, case, checkpoint) -> dict[str, Any]:
    """The reference labels, their geometry and what the datalist entry or the checkpoint
    say about them (classes and names, ignore class, annotated and degraded frames)."""
    out: dict[str, Any] = {"labels": None, "labels_source": None, "ignore": None,
                           "annotated": None, "degraded": [], "case": None, "dims": None}
    if checkpoint is not None:
        from clstm4d.data import ignore_index
        from clstm4d.engine.run.checkpoint import Checkpoint

        ck = Checkpoint.open(checkpoint)
        labels = dict(ck.saved.labels) or {k: f"class{k}" for k in
                                           range(ck.saved.model_spec.out_channels)}
        out.update(labels=labels, labels_source=f"checkpoint {ck.path}",
                   ignore=ignore_index(labels))
    if datalist is not None:
        dl = load_datalist(datalist)
        chosen = _datalist_case(dl, case, datalist)
        data = load_case(chosen)
        out.update(label=data.label, geometry=data.geometry, dims=dl.spatial_dims,
                   annotated=np.flatnonzero(data.labelled).tolist(), ignore=dl.ignore_index,
                   case=chosen.name, degraded=chosen.meta.get("degraded", []),
                   path=label_path(data.geometry.sources or [chosen.name]))
        if dl.labels:
            out.update(labels=dl.labels, labels_source=f"datalist {datalist}")
    else:
        out["label"], out["geometry"] = read_label(
            label if isinstance(label, (str, Path)) or len(label) != 1 else label[0])
        out["path"] = label_path(label)
    return out


def _datalist_case(dl, name: str | None, path):
    cases = dl.cases()
    if name is None:
        labelled = [c for c in cases if c.label is not None]
        if len(labelled) == 1:
            return labelled[0]
        raise UserError(f"datalist {path} has {len(labelled)} labelled cases: name one with "
                        f"--case ({', '.join(c.name for c in labelled[:20])})")
    for c in cases:
        if c.name == name:
            if c.label is None:
                raise UserError(f"case '{name}' of datalist {path} has no label")
            return c
    raise UserError(f"no case '{name}' in datalist {path} (cases: "
                    f"{', '.join(c.name for c in cases[:20])})")


def write_evaluation(result: EvaluationResult, out: str | Path) -> list[Path]:
    """Write ``frames.csv``, ``summary.json``, ``dice_per_frame.png`` and
    ``volume_per_frame.png`` for an :func:`evaluate_files` result into ``out``."""
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [write_frames_csv(result.rows, out / "frames.csv", result.units())]
    atomic_write_text(out / "summary.json", json.dumps(json_finite(result.summary()), indent=2))
    written.append(out / "summary.json")
    names = list(result.class_names.values())
    curves = {n: [r[f"dice_{n}"] for r in result.rows] for n in names}
    written.append(plot_dice_per_frame(curves, out / "dice_per_frame.png",
                                       degraded=result.degraded, ylabel="Dice",
                                       frames=result.frames))
    written.append(plot_volumes(result.rows, names, out / "volume_per_frame.png"))
    return written


def dice_by_degradation(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean per-frame Dice of ``rows`` (from any number of sequences) grouped by their
    ``"degradation"`` kind; ``"clean"`` for the frames without one.

    Examples:
        >>> rows = [{"dice": 1.0, "degradation": ""}, {"dice": 0.5, "degradation": "snr"},
        ...         {"dice": 0.7, "degradation": "snr"}]
        >>> dice_by_degradation(rows)
        {'clean': 1.0, 'snr': 0.6}
    """
    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(r.get("degradation") or "clean", []).append(r["dice"])
    return {k: nanmean(v) for k, v in groups.items()}


def write_frames_csv(rows: list[dict[str, Any]], path: str | Path,
                     units: dict[str, str] | None = None) -> Path:
    """Write per-frame rows (dicts with the same keys) as CSV; NaN is written empty; a
    column with a unit in ``units`` gets it in its header (``hd95_lv [mm]``)."""
    path = Path(path)
    if not rows:
        atomic_write_text(path, "")
        return path
    keys = list(rows[0])
    for r in rows[1:]:
        keys += [k for k in r if k not in keys]
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([f"{k} [{units[k]}]" if units and k in units else k for k in keys])
    for r in rows:
        w.writerow(["" if isinstance(v, float) and math.isnan(v) else v
                    for v in (r.get(k, "") for k in keys)])
    atomic_write_text(path, buf.getvalue())
    return path
