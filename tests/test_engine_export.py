"""clstm4d export: the ONNX streaming step run by onnxruntime through the Predictor against the
PyTorch model (2D and 3D, unidirectional, state carried over chunks and windows), the state
layout its metadata documents against the state PyTorch returns, the refusals, and the MONAI
bundle instantiated by MONAI's ConfigParser and run by ``python -m monai.bundle run``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from clstm4d.cli import main
from clstm4d.data import Geometry, read_label, write_image
from clstm4d.engine.apps.export import export_bundle, export_onnx
from clstm4d.engine.inference.onnx_model import StepSpec, load_onnx
from clstm4d.engine.inference.predictor import Predictor
from clstm4d.engine.run.checkpoint import save_checkpoint
from clstm4d.engine.run.config import Config, ModelSpec, SavedRun
from clstm4d.errors import ConfigError
from clstm4d.models import create_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

LABELS = {0: "background", 1: "a", 2: "b"}


def _checkpoint(folder: Path, seed: int = 0, **model_args) -> Path:
    torch.manual_seed(seed)
    model = create_model(**{"name": "tiny", "in_channels": 1, "out_channels": 3,
                            "channels": (4, 8), **model_args}).eval()
    cfg = Config.from_dict({"data": {"normalize": "zscore"}, "predict": {"device": "cpu"}})
    return save_checkpoint(folder, model, step=1,
                           config=SavedRun(cfg, ModelSpec.of(model), LABELS).to_dict())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One 2D LSTM (one recurrent level) and one 3D GRU (recurrence at every level, gated
    fusion), each saved and exported once."""
    root = tmp_path_factory.mktemp("export")
    cases = {2: {"spatial_dims": 2, "cell": "lstm"},
             3: {"spatial_dims": 3, "cell": "gru", "temporal": "skips", "fusion": "gated"}}
    out = {}
    for dims, args in cases.items():
        ck = _checkpoint(root / f"ck{dims}", seed=dims, **args)
        out[dims] = (ck, export_onnx(ck, root / f"model{dims}.onnx"))
    return out


def _image(shape, seed=0):
    return np.random.default_rng(seed).normal(2.0, 1.5, shape).astype(np.float32)


@pytest.mark.parametrize("dims,shape,roi", [(2, (6, 1, 17, 13), [12, 12]),
                                            (3, (5, 1, 11, 9, 8), [8, 8, 8])])
def test_onnx_predictor_equals_pytorch_with_state_over_chunks_and_windows(exported, dims,
                                                                          shape, roi):
    ck, onnx_file = exported[dims]
    kw = {"device": "cpu", "chunk": 2, "roi": roi, "overlap": 0.5}
    torch_p = Predictor.from_checkpoint(ck, **kw)
    onnx_p = Predictor.from_checkpoint(onnx_file, **kw)
    assert onnx_p.run.labels == LABELS and onnx_p.model.streamable
    image = _image(shape)
    want, want_probs = torch_p.predict_array(image, return_probs=True)
    got, got_probs = onnx_p.predict_array(image, return_probs=True)
    np.testing.assert_allclose(got_probs, want_probs, atol=1e-4)
    assert (got == want).mean() >= 0.999


@pytest.mark.parametrize("dims", [2, 3])
def test_onnx_logits_with_carried_state_equal_pytorch_and_state_shapes_are_documented(
        exported, dims):
    ck, onnx_file = exported[dims]
    model = Predictor.from_checkpoint(ck, device="cpu").model
    onnx_model, _ = load_onnx(onnx_file)
    x = torch.from_numpy(_image((2, 5, 1, *(12, 10, 9)[:dims], ), seed=1))
    with torch.no_grad():
        want, state = model(x[:, :3], return_state=True)
        want2 = model(x[:, 3:], state=state)
    got, got_state = onnx_model(x[:, :3], return_state=True)
    got2 = onnx_model(x[:, 3:], state=got_state)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4)
    np.testing.assert_allclose(got2.numpy(), want2.numpy(), atol=1e-4)
    # the metadata's state layout is the state PyTorch returns (for the padded input)
    flat = [t for level in state for t in (level if isinstance(level, tuple) else (level,))]
    spec = onnx_model.step
    padded = tuple(-(-s // m) * m for s, m in zip(x.shape[3:], spec.spatial_multiple,
                                                    strict=True))
    assert [s.shape(2, padded) for s in spec.states] == [tuple(t.shape) for t in flat]
    import onnx

    proto = onnx.load(str(onnx_file))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert StepSpec.from_json(meta["clstm4d.step"]) == spec
    assert spec.states[0].describe() in proto.graph.doc_string and spec.frames == 1
    dims_of = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
               for i in proto.graph.input}
    assert dims_of["frames"][0] == "n" and dims_of["frames"][1] == 1
    assert all(dims_of[s.name][1] == "n" for s in spec.states)


def test_cli_export_then_predict_with_onnx_writes_pytorchs_labels(exported, tmp_path):
    ck, _ = exported[2]
    geometry = Geometry.default("nifti", (17, 13), 6, spacing=(1.0, 1.0))
    src = write_image(_image((6, 1, 17, 13), seed=2), geometry, tmp_path / "scan.nii.gz")[0]
    assert main(["export", "--checkpoint", str(ck), "--format", "onnx", "--frames", "2",
                 "--out", str(tmp_path / "m.onnx")]) == 0
    for name, checkpoint in (("torch", ck), ("onnx", tmp_path / "m.onnx")):
        assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(src),
                     "--output", str(tmp_path / f"{name}.nii.gz"), "--chunk", "4"]) == 0
    want, _ = read_label(tmp_path / "torch.nii.gz", 2)
    got, g = read_label(tmp_path / "onnx.nii.gz", 2)
    np.testing.assert_allclose(g.affine, geometry.affine)
    assert (got == want).mean() >= 0.999
    # a step of 2 frames cannot carry its state out of a chunk of 3
    p = Predictor.from_checkpoint(tmp_path / "m.onnx", device="cpu", chunk=3)
    with pytest.raises(ConfigError, match="multiple of 2"):
        p.predict_array(_image((6, 1, 8, 8)))


def test_fixed_window_model_exports_its_window_and_bidirectional_is_refused(tmp_path, capsys):
    # batch norm and dropout: an export must not leave the model in training mode
    ck = _checkpoint(tmp_path / "tac", name="tac-tiny", spatial_dims=2, frames=3, norm="batch",
                     dropout=0.2)
    out = export_onnx(ck, tmp_path / "tac.onnx")
    kw = {"device": "cpu", "roi": [8, 8]}
    image = _image((7, 1, 10, 9))  # 3 windows, the last one padded
    want = Predictor.from_checkpoint(ck, **kw).predict_array(image, return_probs=True)
    got = Predictor.from_checkpoint(out, **kw).predict_array(image, return_probs=True)
    np.testing.assert_allclose(got[1], want[1], atol=1e-4)
    assert (got[0] == want[0]).mean() >= 0.999

    bi = _checkpoint(tmp_path / "bi", spatial_dims=2, bidirectional=True)
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(bi), "--format", "onnx",
                 "--out", str(tmp_path / "bi.onnx")]) == 2
    err = capsys.readouterr().err
    assert "bidirectional" in err and "later frames" in err and err.count("\n") == 1
    assert not (tmp_path / "bi.onnx").exists()
    attention = _checkpoint(tmp_path / "att", spatial_dims=2, cell="attention")
    with pytest.raises(ConfigError, match="memory-attention"):
        export_onnx(attention, tmp_path / "att.onnx")
    assert not (tmp_path / "att.onnx").exists()


def test_bad_onnx_inputs_are_one_line_and_write_nothing(exported, tmp_path, capsys,
                                                        monkeypatch):
    ck, onnx_file = exported[2]
    src = write_image(_image((3, 1, 8, 8)), Geometry.default("nifti", (8, 8), 3),
                      tmp_path / "scan.nii.gz")[0]
    other = tmp_path / "other.onnx"  # an ONNX model, but not a clstm4d export
    with warnings.catch_warnings():  # the exporter's deprecation and tracer warnings
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.nn.Conv2d(1, 2, 3), (torch.zeros(1, 1, 8, 8),), str(other),
                          dynamo=False)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")

    def predict(checkpoint):
        capsys.readouterr()
        rc = main(["predict", "--checkpoint", str(checkpoint), "--input", str(src),
                   "--output", str(tmp_path / "seg.nii.gz")])
        return rc, capsys.readouterr().err

    for checkpoint, words in ((other, "not a clstm4d ONNX export"),
                              (tmp_path / "junk.onnx", "not a readable ONNX model"),
                              (tmp_path / "missing.onnx", "not found")):
        rc, err = predict(checkpoint)
        assert rc == 2 and words in err and err.count("\n") == 1, err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    rc, err = predict(onnx_file)
    assert rc == 2 and "pip install 'clstm4d[onnx]'" in err and err.count("\n") == 1
    assert not (tmp_path / "seg.nii.gz").exists()
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(ck), "--format", "onnx",
                 "--out", str(tmp_path / "x.onnx")]) == 2
    assert "pip install" in capsys.readouterr().err
    monkeypatch.undo()
    for out, words in ((onnx_file, "already exists"), (tmp_path / "x.txt", "end in .onnx")):
        assert main(["export", "--checkpoint", str(ck), "--format", "onnx",
                     "--out", str(out)]) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "x.txt").exists()


# ------------------------------------------------------------------------------ MONAI bundle

def test_monai_bundle_instantiates_and_runs(exported, tmp_path):
    from monai.bundle import ConfigParser

    ck, _ = exported[2]
    bundle = export_bundle(ck, tmp_path / "bundle")
    assert {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} == {
        "configs/metadata.json", "configs/inference.json", "configs/clstm4d.json",
        "configs/logging.conf",
        "models/model.pt", "docs/README.md"}
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"]["2"] == "b"
    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    parser["bundle_root"] = str(bundle)
    assert parser["network_def"]["_target_"] == "clstm4d.models.TimeResolvedUNet"
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    reference = Predictor.from_checkpoint(ck, device="cpu")
    x = torch.from_numpy(_image((1, 4, 1, 12, 12)))
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), reference.model(x))

    image = _image((5, 1, 14, 12), seed=3)
    src = write_image(image, Geometry.default("nifti", (14, 12), 5), tmp_path / "s.nii.gz")[0]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file",
         str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle),
         "--input_path", str(src), "--output_path", str(tmp_path / "seg.nii.gz")],
        capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got, _ = read_label(tmp_path / "seg.nii.gz", 2)
    np.testing.assert_array_equal(got, reference.predict_array(image))


def test_monai_bundle_refuses_to_replace_things(exported, tmp_path):
    from clstm4d.errors import UserError

    ck, _ = exported[2]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        export_bundle(ck, tmp_path / "full")
    with pytest.raises(UserError, match="holds the checkpoint"):
        export_bundle(ck, ck.parent, overwrite=True)
    assert (tmp_path / "full" / "keep.txt").exists() and (ck / "model.safetensors").exists()
