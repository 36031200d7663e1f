"""Package-level guarantees: the import stays light."""

import subprocess
import sys


def test_import_loads_no_optional_dependency():
    code = (
        "import sys, clstm4d; "
        "heavy = {'nibabel', 'nrrd', 'tifffile', 'monai', 'matplotlib', 'yaml', 'scipy'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={"PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1] / "src")},
    )
    assert out.stdout.strip() == "[]", out.stdout
