"""The shape of the code, checked: no function over 60 code lines, no source file over 800
lines. (The import layers and the absence of import cycles are import-linter's contracts in
pyproject.toml, run by `make test`; see docs/architecture.md.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "clstm4d"
MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 800


def code_lines(lines: list[str], node: ast.AST) -> int:
    """Lines of ``node`` that hold code: its docstring, blank lines and comment lines left
    out (nested functions count towards the function that holds them)."""
    doc: set[int] = set()
    body = getattr(node, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        doc = set(range(body[0].lineno, body[0].end_lineno + 1))
    return sum(1 for i in range(node.lineno, node.end_lineno + 1)
               if i not in doc and lines[i - 1].strip()
               and not lines[i - 1].strip().startswith("#"))


def test_code_lines_counts_what_it_says():
    text = 'def f(x):\n    """Doc.\n\n    More."""\n    # a comment\n\n    y = x\n    return y\n'
    (node,) = ast.parse(text).body
    assert code_lines(text.splitlines(), node) == 3


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_short_functions_and_files(path):
    text = path.read_text()
    lines = text.splitlines()
    assert len(lines) <= MAX_FILE_LINES, f"{path.name} has {len(lines)} lines"
    long = [f"{node.name} (line {node.lineno}): {n}" for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and (n := code_lines(lines, node)) > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} code lines: {long}"
