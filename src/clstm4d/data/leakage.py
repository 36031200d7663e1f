"""No leakage between the sections of a datalist: the same image in ``training`` and in
``validation`` or ``test`` would make the scores of the latter meaningless.

Two cases hold the same image when they name the same file (after resolving links and
relative paths; for a per-frame series, any frame file) or files of identical content (the
whole sequence: every frame identical). Content is hashed (sha256) only for cases whose file
sizes match a case of the other section, so a datalist without duplicates reads no image.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from ._common import DataError
from .datalist import Case, Datalist
from .io import frame_files

__all__ = ["check_no_leakage"]


def _files(case: Case) -> tuple[Path, ...]:
    paths = case.image if isinstance(case.image, (list, tuple)) else [case.image]
    out: list[Path] = []
    for p in map(Path, paths):
        out += frame_files(p) if p.is_dir() else [p]
    return tuple(Path(os.path.realpath(p)) for p in out)


def _sizes(files: Sequence[Path]) -> tuple[int, ...] | None:
    try:
        return tuple(p.stat().st_size for p in files)
    except OSError:  # a missing file: the reader names it
        return None


def _digest(files: Sequence[Path], cache: dict[Path, str]) -> tuple[str, ...]:
    for p in files:
        if p not in cache:
            with open(p, "rb") as f:
                cache[p] = hashlib.file_digest(f, "sha256").hexdigest()
    return tuple(cache[p] for p in files)


def check_no_leakage(datalist: Datalist, held_out: Sequence[str] = ("validation", "test")
                     ) -> None:
    """Refuse a datalist whose ``training`` section shares an image with a ``held_out``
    section, in one line naming both cases and how they are the same.

    Raises:
        DataError: naming the datalist, the two cases, their sections and files.
    """
    train = [(c, _files(c)) for c in datalist.training]
    others = [(s, c, _files(c)) for s in held_out for c in getattr(datalist, s)]
    by_file = {p: c for c, files in train for p in files}
    for section, case, files in others:
        shared = next((p for p in files if p in by_file), None)
        if shared is not None:
            _refuse(datalist, by_file[shared], section, case, f"both use {shared}")
    by_size: dict[tuple[int, ...], list[tuple[Case, tuple[Path, ...]]]] = {}
    for c, files in train:
        sizes = _sizes(files)
        if sizes is not None:
            by_size.setdefault(sizes, []).append((c, files))
    cache: dict[Path, str] = {}
    for section, case, files in others:
        sizes = _sizes(files)
        for c, train_files in by_size.get(sizes, []) if sizes is not None else []:
            if _digest(files, cache) == _digest(train_files, cache):
                _refuse(datalist, c, section, case,
                        f"{train_files[0].name} and {files[0].name} have identical content")


def _refuse(datalist: Datalist, train_case: Case, section: str, case: Case, how: str) -> None:
    raise DataError(f"training case {train_case.name!r} and {section} case {case.name!r} hold "
                    f"the same image ({how}): its {section} scores would be scores on "
                    "training data; keep each image in one section", datalist.path)
