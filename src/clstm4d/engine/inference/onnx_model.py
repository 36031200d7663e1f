"""A clstm4d model exported to ONNX (``clstm4d export --format onnx``), run with onnxruntime
behind the same contract as the PyTorch models, so that the :class:`Predictor` runs it through
the same windows, chunks and carried state.

Shape legend: ``n`` batch, ``t`` frames, ``c`` input channels, ``k`` classes, ``*s`` spatial
axes, ``f`` the frames of one exported step.

What the file holds (one streaming step; written by :mod:`clstm4d.engine.apps.export`):

- inputs ``frames`` ``(n, f, c, *s)`` float32 and one input per recurrent state tensor
  (``h_level{L}``, and ``c_level{L}`` for an LSTM: ``(1, n, channels, *s / divisor)``);
- outputs ``logits`` ``(n, f, k, *s)`` and the state after the step (``new_h_level{L}``, ...);
- batch and spatial sizes are dynamic (each spatial size a multiple of ``spatial_multiple``:
  :class:`OnnxModel` pads with zeros as the network itself does, and crops the logits back);
  ``f`` is fixed at export (default 1), since exporting traces the time loop frame by frame;
- metadata (``metadata_props``): ``clstm4d.format`` (:data:`FORMAT`), ``clstm4d.run`` (the
  checkpoint's ``config.json``: model, training settings, class names) and ``clstm4d.step``
  (:class:`StepSpec` as JSON: frames per step, streamable, the spatial multiple and every
  state tensor's name, channels and divisor). The graph's ``doc_string`` says the same in
  words.

A fixed-window (time-as-channels) model is exported as a whole window of ``frames`` frames
with no state (``streamable`` false).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clstm4d.engine.run.config import SavedRun
from clstm4d.errors import CheckpointError, ConfigError, UserError

__all__ = ["FORMAT", "INSTALL", "OnnxModel", "StateSpec", "StepSpec", "is_onnx", "load_onnx"]

#: the value of the ``clstm4d.format`` metadata entry this version writes and reads
FORMAT = "clstm4d-onnx-step/1"
#: how to install what running an export needs
INSTALL = "pip install 'clstm4d[onnx]' (onnx and onnxruntime)"


def is_onnx(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an ONNX file (by its suffix), rather than a checkpoint."""
    return Path(path).suffix.lower() == ".onnx"


@dataclass(frozen=True)
class StateSpec:
    """One recurrent state tensor of the step: ``(leading, n, channels, *(s_padded //
    divisor))``, fed as input ``name`` and returned as output ``"new_" + name``."""

    name: str
    leading: int
    channels: int
    divisor: tuple[int, ...]

    def shape(self, batch: int, spatial: tuple[int, ...]) -> tuple[int, ...]:
        """The shape for a batch of ``batch`` inputs of padded spatial size ``spatial``."""
        return (self.leading, batch, self.channels,
                *(s // d for s, d in zip(spatial, self.divisor, strict=True)))

    def describe(self) -> str:
        axes = ", ".join(f"s{i}/{d}" for i, d in enumerate(self.divisor))
        return f"{self.name} ({self.leading}, n, {self.channels}, {axes})"


@dataclass(frozen=True)
class StepSpec:
    """What the step takes: ``frames`` per call, whether the state is carried
    (``streamable``), the multiple each spatial size must be, and the state tensors."""

    frames: int
    streamable: bool
    spatial_multiple: tuple[int, ...]
    states: tuple[StateSpec, ...] = ()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> StepSpec:
        raw = json.loads(text)
        states = tuple(StateSpec(s["name"], int(s["leading"]), int(s["channels"]),
                                 tuple(int(d) for d in s["divisor"])) for s in raw["states"])
        return cls(int(raw["frames"]), bool(raw["streamable"]),
                   tuple(int(m) for m in raw["spatial_multiple"]), states)

    def describe(self) -> str:
        """The inputs and outputs in words (the graph's ``doc_string``)."""
        axes = ", ".join(f"s{i}" for i in range(len(self.spatial_multiple)))
        text = (f"clstm4d streaming step: frames (n, {self.frames}, c, {axes}) float32, each "
                f"spatial size a multiple of {list(self.spatial_multiple)} (pad with zeros at "
                f"the end, crop the logits back) -> logits (n, {self.frames}, k, {axes}).")
        if self.states:
            text += (" State inputs (zeros before the first frame), returned after the step "
                     "as new_<name>: " + "; ".join(s.describe() for s in self.states) + ".")
        elif not self.streamable:
            text += f" A fixed window of {self.frames} frames, no state."
        return text


class _Partial:
    """The 'state' after a call whose last step was padded in time: it must not be carried."""


class OnnxModel(torch.nn.Module):
    """An exported step behind the :class:`~clstm4d.models.SequenceModel` contract:
    ``forward(x (n, t, c, *s), state=None, return_state=False) -> logits (n, t, k, *s)``,
    running onnxruntime ``t / frames`` times with the state carried between calls.

    Args:
        session: an ``onnxruntime.InferenceSession`` of an export.
        step: its :class:`StepSpec`; model_config: the model's ``config`` (ModelSpec dict).

    Attributes:
        streamable, frames, config: as the PyTorch model's (``frames`` is the window of a
        fixed-window model, None otherwise); ``step``: the :class:`StepSpec`.
    """

    def __init__(self, session: Any, step: StepSpec, model_config: dict[str, Any]) -> None:
        super().__init__()
        self.session, self.step, self.config = session, step, dict(model_config)
        self.streamable = step.streamable
        self.frames = None if step.streamable else step.frames

    def _zeros(self, batch: int, spatial: tuple[int, ...]) -> list[np.ndarray]:
        return [np.zeros(s.shape(batch, spatial), np.float32) for s in self.step.states]

    def forward(self, x: torch.Tensor, state: Any = None, return_state: bool = False):
        """Shape: ``(n, t, c, *s)`` -> logits ``(n, t, k, *s)``; ``t`` a multiple of the
        step's frames, or any ``t`` when the state is not carried further."""
        if isinstance(state, _Partial):
            raise ConfigError(
                f"this ONNX export takes {self.step.frames} frames per step; chunks of frames "
                f"must be a multiple of {self.step.frames} (set --chunk)")
        n, t = x.shape[:2]
        spatial = tuple(x.shape[3:])
        pad = [-s % m for s, m in zip(spatial, self.step.spatial_multiple, strict=True)]
        f = self.step.frames
        a = x.detach().to("cpu", torch.float32).numpy()
        a = np.pad(a, [(0, 0), (0, -t % f), (0, 0), *((0, p) for p in pad)])  # (n, t+, c, *s+)
        states = list(state) if state is not None else self._zeros(n, a.shape[3:])
        names = [s.name for s in self.step.states]
        out = []
        for t0 in range(0, a.shape[1], f):
            feed = dict(zip(names, states, strict=True))
            res = self.session.run(None, {"frames": a[:, t0:t0 + f], **feed})
            out.append(res[0])
            states = res[1:]
        logits = np.concatenate(out, 1)[:, :t]  # (n, t, k, *s+)
        logits = torch.from_numpy(logits[(..., *(slice(0, s) for s in spatial))].copy())
        logits = logits.to(x.device)
        if not return_state:
            return logits
        return logits, (_Partial() if t % f else tuple(states))


def _session(path: Path) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError(f"running an ONNX model needs onnxruntime: {INSTALL}") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the thread budget torch has
    options.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(str(path), options, providers=ort.get_available_providers())
    except Exception as e:  # onnxruntime raises its own error types for unreadable files
        raise CheckpointError(f"{path} is not a readable ONNX model: "
                              f"{str(e).splitlines()[0][:200]}") from None


def load_onnx(path: str | os.PathLike) -> tuple[OnnxModel, SavedRun]:
    """Open a ``clstm4d export --format onnx`` file: the model (run with onnxruntime) and the
    run configuration it was exported with.

    Raises:
        UserError: onnxruntime is missing (names the install command).
        CheckpointError: the file is missing, not ONNX, or an ONNX model that is not a
            clstm4d export (or one of another format version).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ONNX model not found: {path}")
    session = _session(path)
    meta = session.get_modelmeta().custom_metadata_map
    found = meta.get("clstm4d.format")
    if found != FORMAT:
        what = ("has no clstm4d metadata" if found is None
                else f"is of export format {found!r}, this version reads {FORMAT!r}")
        raise CheckpointError(f"{path} is not a clstm4d ONNX export: it {what}; export one "
                              "with `clstm4d export --checkpoint RUN --format onnx`")
    try:
        step = StepSpec.from_json(meta["clstm4d.step"])
        run = SavedRun.from_dict(json.loads(meta["clstm4d.run"]), source=str(path))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged clstm4d metadata ({e})") from None
    return OnnxModel(session, step, run.model_spec.to_dict()), run
