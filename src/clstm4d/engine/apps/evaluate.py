"""``clstm4d evaluate``: score a prediction against its reference and write the tables and
plots, into an output folder checked before the (slow) evaluation and written as a whole
(a killed or failed run leaves the earlier output or the complete new one)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clstm4d._common import atomic_dir
from clstm4d.engine.evaluation.evaluate import (
    EvaluationResult,
    evaluate_files,
    write_evaluation,
)
from clstm4d.engine.run.folders import OutputFolder

__all__ = ["run_evaluate"]


def run_evaluate(pred: str | Path | Sequence[str | Path],
                 label: str | Path | Sequence[str | Path] | None = None, *,
                 out: str | Path | None = None, overwrite: bool = False,
                 **options: Any) -> tuple[EvaluationResult, list[Path]]:
    """:func:`~clstm4d.engine.evaluation.evaluate.evaluate_files` (``options`` are its
    keyword arguments), then, with ``out``, its files written there.

    Returns:
        ``(result, files written)``.
    """
    folder = OutputFolder(out, "evaluate", overwrite=overwrite) if out else None
    if folder is not None:
        folder.check()
    result = evaluate_files(pred, label, **options)
    if folder is None:
        return result, []
    # all files at once: into a temporary folder renamed onto ``out`` (into a folder of
    # the user's files, given --overwrite, they move in one by one)
    with atomic_dir(out, replace=not folder.foreign) as tmp:
        names = [p.name for p in write_evaluation(result, tmp)]
        folder.record(at=tmp)
    return result, [Path(out) / n for n in names]
