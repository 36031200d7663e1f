"""``clstm4d export``: a trained model for deployment, as one ONNX streaming step or as a MONAI
bundle.

Shape legend: ``n`` batch, ``f`` frames per step, ``c`` channels, ``k`` classes, ``*s``
spatial axes.

**ONNX.** Exporting traces the network, and tracing unrolls its time loop: an export of a
whole sequence would only ever take the number of frames it was traced with, and a state kept
inside the module would be baked in as constant zeros. So the export is one step of ``f``
frames (default 1) with the recurrent state as explicit inputs and outputs (see
:mod:`clstm4d.engine.inference.onnx_model` for the layout and the metadata); batch and spatial
sizes stay dynamic. The TorchScript-based exporter (``dynamo=False``) is used; the
recurrence is built with its autograd-op backend for it (same weights). Every export is
checked before it is written: onnxruntime runs it on a batch of 2, at another spatial size
than the traced one, over two steps with the state carried, and must give PyTorch's logits.
A bidirectional model has no streaming step (every frame depends on later frames) and is
refused; a fixed-window model is exported as its window, without state.

**MONAI bundle.** ``configs/metadata.json``, ``configs/inference.json`` (the network as
``_target_: clstm4d.models.<Class>`` with its arguments, the weights loaded from
``models/model.pt``, and a ``run`` that segments ``input_path`` into ``output_path`` with the
:class:`~clstm4d.engine.inference.predictor.Predictor`), ``configs/clstm4d.json`` (the
checkpoint's configuration: normalisation, spacing, windows, class names),
``configs/logging.conf`` and ``docs/README.md``::

    python -m monai.bundle run --config_file DIR/configs/inference.json --bundle_root DIR \\
        --input_path scan.nii.gz --output_path seg.nii.gz
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clstm4d._common import atomic_dir, atomic_file, check_choice
from clstm4d.engine.inference.onnx_model import (
    FORMAT,
    INSTALL,
    StateSpec,
    StepSpec,
    is_onnx,
)
from clstm4d.engine.run.checkpoint import Checkpoint
from clstm4d.engine.run.folders import check_outputs, same_file
from clstm4d.errors import ConfigError, UserError

__all__ = ["FORMATS", "export_bundle", "export_onnx", "run_export"]

#: what ``--format`` accepts
FORMATS = ("onnx", "monai-bundle")
#: the ONNX opset written
OPSET = 17


def run_export(checkpoint: str | os.PathLike, fmt: str, out: str | os.PathLike, *,
               frames: int = 1, overwrite: bool = False) -> Path:
    """``clstm4d export``: :func:`export_onnx` or :func:`export_bundle`; returns ``out``."""
    check_choice("--format", fmt, FORMATS)
    if fmt == "onnx":
        return export_onnx(checkpoint, out, frames=frames, overwrite=overwrite)
    return export_bundle(checkpoint, out, overwrite=overwrite)


# ------------------------------------------------------------------------------ ONNX

class _Step(torch.nn.Module):
    """``(frames, *state tensors) -> (logits, *new state tensors)``: the model's opaque state
    (one entry per recurrent level: a tensor, or a tuple of them) as flat tensors."""

    def __init__(self, model: torch.nn.Module, layout: list[int]) -> None:
        super().__init__()
        self.model, self.layout = model, layout  # layout: tensors per level

    def forward(self, frames: torch.Tensor, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.model.streamable:
            return (self.model(frames),)
        state, i = [], 0
        for count in self.layout:
            state.append(flat[i] if count == 1 else tuple(flat[i:i + count]))
            i += count
        logits, new = self.model(frames, state=tuple(state), return_state=True)
        return (logits, *_flatten(new))


def _flatten(state: Any) -> list[torch.Tensor]:
    return [t for level in state
            for t in (level if isinstance(level, (tuple, list)) else (level,))]


def _traceable(opened: Checkpoint) -> torch.nn.Module:
    """The checkpoint's model, built with the recurrence's autograd-op backend (the fused
    one is a custom autograd function that tracing cannot see through) and without
    activation recomputation (a training-time saving)."""
    spec = opened.saved.model_spec
    inference = {"backend": "reference", "recompute": False}
    spec = dataclasses.replace(spec, options={
        **spec.options, **{k: v for k, v in inference.items() if k in spec.options}})
    model = spec.build()
    opened.load_weights(model)
    return model.eval()


def _multiple(model: torch.nn.Module) -> tuple[int, ...]:
    """What each spatial size must be a multiple of (the product of the pooling strides)."""
    from clstm4d.models.unet import total_strides

    net = getattr(model, "unet", model)  # a time-as-channels model wraps a UNet
    return tuple(int(m) for m in total_strides(net.strides, net.spatial_dims))


def _step_spec(model: torch.nn.Module, frames: int) -> tuple[StepSpec, list[int]]:
    """Probe the model once for its state tensors: their names, channels and the ratio of
    the input's spatial size to theirs."""
    multiple = _multiple(model)
    if not model.streamable:
        return StepSpec(int(model.frames), False, multiple), []
    probe = tuple(2 * m for m in multiple)
    x = torch.zeros(1, 1, model.in_channels, *probe)
    with torch.no_grad():
        _, state = model(x, return_state=True)
    levels = list(getattr(model, "recurrence", {})) or [str(i) for i in range(len(state))]
    specs, layout = [], []
    for level, entry in zip(levels, state, strict=True):
        tensors = entry if isinstance(entry, (tuple, list)) else (entry,)
        layout.append(len(tensors))
        for letter, t in zip("hc", tensors, strict=False):
            divisor = tuple(p // s for p, s in zip(probe, t.shape[3:], strict=True))
            specs.append(StateSpec(f"{letter}_level{level}", int(t.shape[0]), int(t.shape[2]),
                                   divisor))
    return StepSpec(frames, True, multiple, tuple(specs)), layout


def _refuse(model: torch.nn.Module, frames: int) -> None:
    if model.config.get("cell") == "attention":
        raise ConfigError(
            "a memory-attention model (cell: attention) cannot be exported to ONNX yet: its "
            "state is a memory of past frames whose size changes from step to step; export "
            "a ConvLSTM or ConvGRU model (cell: lstm or gru)")
    if not model.streamable and model.frames is None:
        raise ConfigError(
            "a bidirectional model cannot be exported to ONNX: every frame's output depends "
            "on later frames, so it has no streaming step (tracing would fix the number of "
            "frames); export a unidirectional model (model.bidirectional: false)")
    if not model.streamable and frames != 1:
        raise ConfigError(f"--frames: a fixed-window model is exported with its window of "
                          f"{model.frames} frames; leave --frames out")


def _trace(step: _Step, spec: StepSpec, model: torch.nn.Module, path: Path) -> None:
    dims = len(spec.spatial_multiple)
    x = torch.zeros(1, spec.frames, model.in_channels, *(2 * m for m in spec.spatial_multiple))
    spatial = {3 + i: f"s{i}" for i in range(dims)}
    axes: dict[str, dict[int, str]] = {"frames": {0: "n", **spatial},
                                       "logits": {0: "n", **spatial}}
    states = []
    for s in spec.states:
        axes[s.name] = axes["new_" + s.name] = {
            1: "n", **{3 + i: f"s{i}/{d}" for i, d in enumerate(s.divisor)}}
        states.append(torch.zeros(s.shape(1, tuple(x.shape[3:]))))
    with warnings.catch_warnings():  # tracer warnings about Python ints in the graph
        warnings.simplefilter("ignore")
        torch.onnx.export(step, (x, *states), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["frames", *(s.name for s in spec.states)],
                          output_names=["logits", *("new_" + s.name for s in spec.states)],
                          dynamic_axes=axes)


def _label(path: Path, spec: StepSpec, run_json: str) -> None:
    """Write the metadata and the description into the exported file."""
    import onnx

    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {"clstm4d.format": FORMAT, "clstm4d.run": run_json,
                                        "clstm4d.step": spec.to_json()})
    proto.doc_string = proto.graph.doc_string = spec.describe()
    proto.producer_name = "clstm4d"
    onnx.save(proto, str(path))


def _verify(path: Path, model: torch.nn.Module, spec: StepSpec) -> None:
    """onnxruntime on the written file must give PyTorch's logits on a batch of 2 at another
    spatial size than the traced one, over two steps with the state carried."""
    from clstm4d.engine.inference.onnx_model import load_onnx

    onnx_model, _ = load_onnx(path)
    size = [2 * m for m in spec.spatial_multiple]
    size[0] = 3 * spec.spatial_multiple[0] + 1  # not a multiple: padded and cropped back
    t = spec.frames if not spec.streamable else 2 * spec.frames
    x = torch.randn(2, t, model.in_channels, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x).numpy()
    got = onnx_model(x).numpy()
    err = float(np.abs(got - want).max())
    if not err <= 1e-4 * (1 + float(np.abs(want).max())):
        raise RuntimeError(f"ONNX export check failed: onnxruntime's logits differ from "
                           f"PyTorch's by {err:.3g}")


def _require(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(f"exporting to ONNX needs {module}: {INSTALL}")


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike, *, frames: int = 1,
                overwrite: bool = False) -> Path:
    """Export the checkpoint's model as one streaming step of ``frames`` frames to ``out``
    (a ``.onnx`` file, written atomically after the check described in the module
    docstring).

    Raises:
        UserError: onnx or onnxruntime missing; ``out`` exists (without ``overwrite``) or
            does not end in ``.onnx``; ConfigError: a bidirectional model.
    """
    _require("onnx")
    _require("onnxruntime")
    out = Path(out)
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ConfigError(f"--frames must be an int >= 1, got {frames!r}")
    if not is_onnx(out):
        raise ConfigError(f"--out {out}: an ONNX export's name must end in .onnx (that is how "
                          "`clstm4d predict --checkpoint` recognises it)")
    check_outputs([out], overwrite=overwrite, option="--out")
    opened = Checkpoint.open(checkpoint)
    model = _traceable(opened)
    _refuse(model, frames)
    spec, layout = _step_spec(model, frames)
    with atomic_file(out) as tmp:
        # eval: the exporter restores the wrapper's mode afterwards, and so the model's
        _trace(_Step(model, layout).eval(), spec, model, tmp)
        _label(tmp, spec, json.dumps(opened.saved.to_dict()))
        _verify(tmp, model, spec)
    return out


# ------------------------------------------------------------------------------ MONAI bundle

def _target(model: torch.nn.Module) -> str:
    """The class's import path under ``clstm4d.models`` (a bundle ``_target_``)."""
    import clstm4d.models

    name = type(model).__name__
    if getattr(clstm4d.models, name, None) is not type(model):
        raise ConfigError(f"a MONAI bundle needs a model class of clstm4d.models; "
                          f"{type(model).__qualname__} is not one")
    return f"clstm4d.models.{name}"


def _inference_config(model: torch.nn.Module) -> dict[str, Any]:
    args = {k: v for k, v in model.config.items() if k != "name"}
    weights = ("torch.load(@bundle_root + '/models/model.pt', map_location=@device, "
               "weights_only=True)")
    return {
        "imports": ["$import json", "$import pathlib", "$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "input_path": None,
        "output_path": None,
        "network_def": {"_target_": _target(model), **args},
        "network": "$@network_def.to(@device)",
        "saved_run": {"_target_": "clstm4d.engine.run.config.SavedRun.from_dict",
                      "raw": "$json.loads(pathlib.Path(@bundle_root, 'configs', "
                             "'clstm4d.json').read_text())"},
        "predictor": {"_target_": "clstm4d.engine.inference.predictor.Predictor",
                      "model": "@network", "run": "@saved_run", "device": "@device"},
        "run": [f"$@network.load_state_dict({weights})",
                "$@predictor.predict_file(@input_path, @output_path, overwrite=True)"],
    }


def _metadata(model: torch.nn.Module, labels: dict[int, str]) -> dict[str, Any]:
    import monai

    from clstm4d import __version__

    k = model.config["out_channels"]
    shape = ["t", *(f"s{i}" for i in range(model.config["spatial_dims"]))]
    return {
        "version": "0.1.0",
        "changelog": {"0.1.0": "exported by clstm4d export --format monai-bundle"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"clstm4d": __version__},
        "name": f"clstm4d {model.config['name']}",
        "task": "segmentation of every frame of an image sequence (2D+t / 3D+t)",
        "description": "A time-resolved segmentation network of clstm4d. Run: python -m "
                       "monai.bundle run --config_file configs/inference.json --bundle_root "
                       ". --input_path IMAGE --output_path LABELS (the formats clstm4d reads "
                       "and writes; see docs/README.md).",
        "authors": "clstm4d export",
        "copyright": "see the training data and code licences",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "dtype": "float32",
                "num_channels": model.config["in_channels"], "spatial_shape": shape,
                "value_range": [], "is_patch_data": False,
                "channel_def": {str(i): f"channel {i}"
                                for i in range(model.config["in_channels"])}}},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "dtype": "uint8",
                "num_channels": 1, "spatial_shape": shape, "value_range": list(range(k)),
                "is_patch_data": False,
                "channel_def": {str(i): labels.get(i, f"class {i}") for i in range(k)}}},
        },
    }


_README = """# clstm4d bundle

Segments every frame of an image sequence (NIfTI, TIFF, NRRD or a folder of frames; the
formats clstm4d reads) and writes the labels in the input's format and geometry.

    pip install clstm4d monai fire
    python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\
        --input_path scan.nii.gz --output_path seg.nii.gz

The network: `network_def` in configs/inference.json (a clstm4d class and its arguments),
weights in models/model.pt; the training settings prediction needs (normalisation, voxel
spacing, windows, class names) in configs/clstm4d.json.
"""


_LOGGING = """[loggers]
keys=root

[handlers]
keys=console

[formatters]
keys=full

[logger_root]
level=INFO
handlers=console

[handler_console]
class=StreamHandler
level=INFO
formatter=full
args=(sys.stdout,)

[formatter_full]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def export_bundle(checkpoint: str | os.PathLike, out: str | os.PathLike, *,
                  overwrite: bool = False) -> Path:
    """Write the checkpoint's model as a MONAI bundle folder ``out`` (see the module
    docstring), atomically.

    Raises:
        UserError: ``out`` is a file, or a non-empty folder without ``overwrite``, or holds
            the checkpoint.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; a MONAI bundle is a folder")
    opened = Checkpoint.open(checkpoint)
    if same_file(out, opened.path) or out.resolve() in opened.path.resolve().parents:
        raise UserError(f"--out {out} holds the checkpoint {opened.path}; choose another "
                        "folder")
    check_outputs([], folder=out, overwrite=overwrite, option="--out")
    model = opened.build_model()
    with atomic_dir(out) as tmp:
        for sub in ("configs", "models", "docs"):
            (tmp / sub).mkdir()
        torch.save(model.state_dict(), tmp / "models" / "model.pt")
        configs = {"inference.json": _inference_config(model),
                   "metadata.json": _metadata(model, opened.saved.labels),
                   "clstm4d.json": opened.saved.to_dict()}
        for name, content in configs.items():
            (tmp / "configs" / name).write_text(json.dumps(content, indent=2) + "\n")
        (tmp / "configs" / "logging.conf").write_text(_LOGGING)
        (tmp / "docs" / "README.md").write_text(_README)
    return out
