"""Configuration values as a person writes them (issue 17): numbers in scientific notation are
numbers in YAML and in `--set`, every type error is reported at once naming its key, a YAML
syntax error names the file and the line, and the README's override example runs as written."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from clstm4d.cli import main
from clstm4d.engine.run.config import Config, load_config
from clstm4d.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _one_error_line(capsys, rc):
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("1E-4", 1e-4), ("2.5e-4", 2.5e-4),
                                         ("1e+2", 100.0), (".5e1", 5.0), ("-1e-3", -1e-3),
                                         ("3", 3.0), ("0.01", 0.01)])
def test_scientific_notation_is_a_number_in_yaml_and_in_set(tmp_path, text, value):
    """Regression: YAML 1.1 (PyYAML) reads `1e-3` as a string, so `lr: 1e-4` and
    `--set train.lr=1e-3` were refused ("must be of type float, got '1e-3'")."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"train:\n  weight_decay: {text}\n  dist_timeout: 1e3\n")
    if value < 0:
        with pytest.raises(ConfigError, match="'train.weight_decay' must be >= 0"):
            load_config(cfg)
        return
    loaded = load_config(cfg, overrides=[f"train.lr={text}"])
    assert loaded.train.weight_decay == value and isinstance(loaded.train.weight_decay, float)
    assert loaded.train.lr == value and loaded.train.dist_timeout == 1000.0
    # strings that only look like numbers stay strings where a string is expected
    assert Config.from_dict(None, ["data.datalist=1e-3x"]).data.datalist == "1e-3x"
    # an integral number in scientific notation is a count; a fraction is not
    assert Config.from_dict(None, ["train.steps=1e3"]).train.steps == 1000
    with pytest.raises(ConfigError, match="'train.steps' must be an integer, got 2.5"):
        Config.from_dict(None, ["train.steps=2.5e0"])


def test_every_type_error_is_reported_at_once_each_naming_its_key(tmp_path, capsys):
    """Regression: configuration errors came one at a time (fix one, run, see the next)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lr: fast\n  steps: 1.5\n  stpes: 3\n"
                   "data:\n  roi: 0\n  augment: maybe\nmodel:\n  name: tiny\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg, overrides=["predict.chunk=-5", "train.amp"])
    msg = str(e.value)
    for key in ("train.lr", "train.steps", "train.stpes", "data.roi", "data.augment",
                "predict.chunk", "'train.amp'"):
        assert key in msg, (key, msg)
    assert msg.startswith("7 configuration errors: ")
    rc = main(["train", "--config", str(cfg), "--print-config"])
    err = _one_error_line(capsys, rc)
    assert "5 configuration errors" in err and "train.lr" in err and "data.augment" in err


@pytest.mark.parametrize("body, line", [
    ("train:\n  lr: 1e-4\n   steps: 3\n", 3),           # a mapping value at a wrong indent
    ("train:\n  steps: [1, 2\nmodel:\n  name: x\n", 3),  # a list never closed
    ("model:\n\tname: tiny\n", 2),                        # a tab
])
def test_a_yaml_syntax_error_names_the_file_and_the_line(tmp_path, capsys, body, line):
    """Regression: "cannot parse config file c.yaml: while scanning ..." gave no line."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(body)
    rc = main(["train", "--config", str(cfg), "--print-config"])
    err = _one_error_line(capsys, rc)
    assert str(cfg) in err and f"line {line}," in err, err


def _readme_override_line() -> str:
    """The README's `train --config ... --set ...` example, exactly as written there."""
    lines = [ln for ln in (ROOT / "README.md").read_text().splitlines()
             if re.match(r"clstm4d train --config \S+ --set ", ln)]
    assert len(lines) == 1, lines
    return lines[0]


def test_the_readme_override_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """Regression: the README's `--set train.lr=1e-3` was refused. The test runs that very
    line (its `my.yaml` written here: tiny data and model, a learning rate in scientific
    notation too) and checks the override reached the saved run."""
    line = _readme_override_line()
    argv = shlex.split(line, comments=True)
    assert argv[0] == "clstm4d"
    monkeypatch.chdir(tmp_path)
    assert main(["synth", "--out", "data", "--cases", "2", "--frames", "3", "--size", "16",
                 "--validation", "0", "--test", "0"]) == 0
    config = argv[argv.index("--config") + 1]
    Path(config).write_text("model:\n  channels: [2, 4]\ndata:\n  datalist: data/datalist.json\n"
                            "  window: 2\n  batch_size: 1\n  roi: 16\n"
                            "train:\n  steps: 2\n  lr: 1e-4\n  progress: false\n"
                            "  warmup_steps: 0\n")
    capsys.readouterr()
    assert main(argv[1:]) == 0, capsys.readouterr().err
    out = Path(argv[argv.index("--out") + 1])
    saved = json.loads(next(out.glob("checkpoints/step_*/config.json")).read_text())
    expected = float(next(a for a in argv if a.startswith("train.lr=")).split("=")[1])
    assert saved["train"]["lr"] == expected == 1e-3
