"""``clstm4d synth``: a synthetic dataset written into an output folder of its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clstm4d.data import write_synthetic_dataset
from clstm4d.engine.run.folders import OutputFolder

__all__ = ["run_synth"]


def run_synth(out: str | Path, options: dict[str, Any], *, overwrite: bool = False) -> Path:
    """:func:`~clstm4d.data.write_synthetic_dataset` into ``out`` (new, empty, or an earlier
    synth's output unless ``overwrite``); returns the datalist."""
    with OutputFolder(out, "synth", overwrite=overwrite):
        return write_synthetic_dataset(out, **options)
