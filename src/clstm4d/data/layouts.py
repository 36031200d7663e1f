"""Dataset layouts as they are distributed, turned into datalist entries.

``datalist_from_folder(folder, layout=...)`` calls these; each returns the labelled entries
(split into training/validation there), the unlabelled ones (``test``) and the layout's class
names.

ACDC (the Automated Cardiac Diagnosis Challenge, cine MRI) ships one folder per patient::

    patient001/patient001_4d.nii.gz          the whole cine sequence (x, y, z, t)
    patient001/patient001_frame01.nii.gz     the end-diastolic (ED) frame as a 3D file
    patient001/patient001_frame01_gt.nii.gz  its ground truth (0 bg, 1 RV, 2 MYO, 3 LV)
    patient001/patient001_frame12.nii.gz     the end-systolic (ES) frame, and
    patient001/patient001_frame12_gt.nii.gz  its ground truth
    patient001/Info.cfg                      "ED: 1", "ES: 12" (1-based frames), "NbFrame: 30", ...

under ``training/`` and ``testing/`` (the dataset root) or directly in the given folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ._common import DataError
from .io import natural_key

__all__ = ["ACDC_LABELS", "acdc_entries", "read_acdc_info"]

ACDC_LABELS = {0: "background", 1: "right ventricle", 2: "myocardium", 3: "left ventricle"}
_PATIENT = re.compile(r"^patient\d+$")


def read_acdc_info(path: Path) -> dict[str, str]:
    """The ``key: value`` lines of an ACDC ``Info.cfg``."""
    if not path.is_file():
        raise DataError("missing Info.cfg (expected lines 'ED: <frame>' and 'ES: <frame>')",
                        path)
    info = {}
    for line in path.read_text(errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


def _acdc_patient(folder: Path) -> tuple[dict[str, Any], bool]:
    """One patient folder -> (datalist entry, has labels)."""
    name = folder.name
    image = folder / f"{name}_4d.nii.gz"
    if not image.is_file():
        raise DataError(f"missing the 4D sequence {image.name}", folder)
    info_path = folder / "Info.cfg"
    info = read_acdc_info(info_path)
    phases = {}
    for phase in ("ED", "ES"):
        value = info.get(phase, "")
        if not value.isdigit() or int(value) < 1:
            raise DataError(f"key '{phase}': expected a 1-based frame number, got "
                            f"{value or 'nothing'!r}", info_path)
        phases[phase] = int(value)
    gts = {phase: folder / f"{name}_frame{frame:02d}_gt.nii.gz"
           for phase, frame in phases.items()}
    present = {phase: p for phase, p in gts.items() if p.is_file()}
    entry: dict[str, Any] = {"name": name, "image": image,
                             "phases": {p: f - 1 for p, f in phases.items()}}
    if not present:
        return entry, False
    missing = [p.name for phase, p in gts.items() if phase not in present]
    if missing:
        raise DataError(f"ground truth {missing} missing (Info.cfg names ED frame "
                        f"{phases['ED']} and ES frame {phases['ES']}; both need a _gt file)",
                        folder)
    entry["label"] = {str(phases[phase] - 1): p for phase, p in present.items()}
    return entry, True


def acdc_entries(folder: Path) -> tuple[list[dict], list[dict], dict[int, str]]:
    """ACDC layout -> (labelled entries, unlabelled entries, class names).

    ``folder`` is the dataset root (``training/`` and ``testing/`` with ``patientNNN/``
    folders: every patient with ground truth is labelled, the others go to ``test``) or a
    folder of ``patientNNN/`` folders. Every bad patient folder is listed in one error.
    """
    roots = [folder / s for s in ("training", "testing") if (folder / s).is_dir()] or [folder]
    patients = [p for r in roots for p in sorted(r.iterdir(), key=natural_key)
                if p.is_dir() and _PATIENT.match(p.name)]
    if not patients:
        raise DataError("expected the ACDC layout: 'training'/'testing' folders or "
                        "'patientNNN' folders holding patientNNN_4d.nii.gz and Info.cfg", folder)
    labelled, unlabelled, problems = [], [], []
    for p in patients:
        try:
            entry, has_label = _acdc_patient(p)
        except DataError as e:
            problems.append(f"{p.name}: {e}")
            continue
        (labelled if has_label else unlabelled).append(entry)
    if problems:
        raise DataError(f"{len(problems)} bad patient folder(s):\n  " + "\n  ".join(problems),
                        folder)
    return labelled, unlabelled, dict(ACDC_LABELS)
