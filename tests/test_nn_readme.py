"""The README's "Layers" example runs as written and agrees with the doctest copy in src."""

import re
from pathlib import Path

import clstm4d.nn

ROOT = Path(__file__).parents[1]


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"## Layers\n.*?```python\n(.*?)```", text, re.S).group(1)


def test_readme_layers_example_runs(capsys):
    exec(compile(_readme_example(), "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == (
        "torch.Size([2, 5, 16, 8, 16, 16]) torch.Size([4, 2, 8, 8, 16, 16])"
    )


def test_doctest_copy_matches_readme():
    doc_lines = [line.strip()[4:] for line in clstm4d.nn.__doc__.splitlines()
                 if line.strip().startswith((">>> ", "... "))]
    readme_lines = [line.strip() for line in _readme_example().splitlines() if line.strip()]
    assert [d.strip() for d in doc_lines] == readme_lines
