"""The one place prediction lives: a trained model plus everything it needs to segment a
sequence the way it was trained.

Shape legend: ``t`` frames, ``c`` input channels, ``k`` classes, ``*s`` spatial axes.

A :class:`Predictor` owns the device and precision, resampling to the voxel spacing of
training (``data.spacing``) and back, the intensity normalisation of training, the sliding
windows over space and the time chunks
(:func:`~clstm4d.engine.inference.sliding.predict_sequence`), and reading and writing files in
their own format and geometry. The CLI's ``predict``, the demo
and validation during training all go through it.

Examples:
    >>> import numpy as np
    >>> from clstm4d.engine.run.config import Config, ModelSpec, SavedRun
    >>> from clstm4d.models import create_model
    >>> model = create_model("tiny", spatial_dims=2, in_channels=1, out_channels=3,
    ...                      channels=(4, 8))
    >>> run = SavedRun(Config(), ModelSpec.of(model), {0: "background", 1: "a", 2: "b"})
    >>> p = Predictor(model, run, device="cpu", chunk=2)
    >>> labels = p.predict_array(np.random.default_rng(0).random((5, 1, 12, 10), np.float32))
    >>> labels.shape, labels.dtype, p.settings.chunk
    ((5, 12, 10), dtype('uint8'), 2)
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clstm4d._common import per_axis
from clstm4d.data import (
    array_geometry,
    check_resample_memory,
    normalize_intensity,
    read_image,
    resample_image,
    target_shape,
    to_grey,
    write_result,
)
from clstm4d.engine.run.checkpoint import Checkpoint
from clstm4d.engine.run.config import PredictConfig, SavedRun, check_values
from clstm4d.engine.run.folders import check_label_outputs
from clstm4d.engine.run.progress import Progress
from clstm4d.engine.run.runtime import amp_dtype, resolve_device
from clstm4d.errors import ConfigError, UserError

from .onnx_model import is_onnx, load_onnx
from .sliding import predict_sequence

__all__ = ["Predictor"]

log = logging.getLogger(__name__)

#: ``PredictConfig`` fields a caller may override per predictor (device and amp are arguments).
OVERRIDABLE = ("roi", "overlap", "chunk", "time_margin", "sw_batch_size", "mode")


class Predictor:
    """Segment sequences with a trained model, as it was trained.

    Args:
        model: maps ``(n, t, c, *s)`` to logits ``(n, t, k, *s)`` (see
            :func:`~clstm4d.engine.inference.sliding.predict_sequence` for streaming).
        run: the typed configuration saved with the model (:class:`SavedRun`).
        device: ``"auto"``, ``"cpu"``, ``"cuda:N"`` or a ``torch.device``; ``None`` = the
            saved ``predict.device``. The model is moved there.
        amp: ``"auto"``, ``"bf16"``, ``"fp16"`` or ``"none"``; ``None`` = the saved
            ``predict.amp``.
        overrides: any of ``roi`` (one int for all axes, or one per axis), ``overlap``,
            ``chunk``, ``time_margin`` (bidirectional models), ``sw_batch_size``, ``mode``;
            ``None`` values keep the saved setting.

    Attributes:
        model, run, device, amp_dtype; ``settings`` (the :class:`PredictConfig` in use).
    """

    def __init__(self, model: torch.nn.Module, run: SavedRun, *,
                 device: str | torch.device | None = None, amp: str | None = None,
                 **overrides: Any) -> None:
        unknown = sorted(set(overrides) - set(OVERRIDABLE))
        if unknown:
            raise ConfigError(f"Predictor: unknown prediction setting(s) {unknown}; "
                              f"known: {list(OVERRIDABLE)}")
        self.run = run
        given = check_values("predict", {k: v for k, v in overrides.items() if v is not None})
        self.settings: PredictConfig = dataclasses.replace(run.config.predict, **given)
        if self.settings.roi is not None:
            self.settings.roi = list(per_axis("'predict.roi'", self.settings.roi,
                                              self.spatial_dims, error=ConfigError))
        if isinstance(device, torch.device):
            self.device = device
        else:
            self.device = resolve_device(device or self.settings.device)
        self.amp_dtype = amp_dtype(self.device, amp or self.settings.amp)
        self.model = model.to(self.device).eval()

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, *,
                        device: str | torch.device | None = None, amp: str | None = None,
                        **overrides: Any) -> Predictor:
        """Rebuild the model saved in ``checkpoint`` (a checkpoint folder, its
        ``model.safetensors`` or a run folder) and wrap it; arguments as the constructor.
        An ``.onnx`` file (``clstm4d export --format onnx``) runs with onnxruntime
        (:mod:`~clstm4d.engine.inference.onnx_model`) through the same windows and chunks;
        the rest (blending, resampling) then runs on the CPU unless ``device`` says
        otherwise."""
        if is_onnx(checkpoint):
            model, run = load_onnx(checkpoint)
            return cls(model, run, device=device or "cpu", amp=amp, **overrides)
        opened = Checkpoint.open(checkpoint, weights_only=True)
        return cls(opened.build_model(), opened.saved, device=device, amp=amp, **overrides)

    # ------------------------------------------------------------------ what the model takes
    @property
    def spatial_dims(self) -> int:
        return self.run.model_spec.spatial_dims

    @property
    def in_channels(self) -> int:
        return self.run.model_spec.in_channels

    @property
    def num_classes(self) -> int:
        """Classes the model predicts, background included."""
        return self.run.model_spec.out_channels

    def model_shape(self, image_shape: Sequence[int], geometry: Any = None,
                    name: str = "input", frames: int = 1) -> tuple[int, ...]:
        """The spatial shape the model sees for an image of spatial shape ``image_shape``:
        resampled to the training spacing (``data.spacing``) when it is set and the geometry
        says where the voxels lie; else the image's own.

        Raises:
            DataError: before anything is resampled, when ``frames`` frames at that shape
                would not fit in the memory the machine has (an input at a much coarser
                spacing than the model's), naming both spacings and the shape.
        """
        target = self.run.config.data.spacing
        image_shape = tuple(int(n) for n in image_shape)
        if target is None:
            return image_shape
        if geometry is None:
            log.warning("%s: no geometry given, so it is taken to be at the model's voxel "
                        "spacing %s already (not resampled)", name, target)
            return image_shape
        try:
            target_shape(image_shape, geometry.spacing, target)
        except ValueError as e:
            raise ConfigError(f"checkpoint's {e}") from None
        # float32: the resampled input and its normalised copy (every frame), the class
        # probabilities of one time chunk and their copy resampled back
        chunk = min(frames, self.settings.chunk or frames)
        per_voxel = 8 * self.in_channels + 8 * self.num_classes * chunk / frames
        return check_resample_memory(image_shape, geometry.spacing, target, frames, per_voxel,
                                     name)

    def prepare(self, image: np.ndarray, name: str = "input",
                geometry: Any = None) -> torch.Tensor:
        """Check the channel count of ``image (t, c, *s)``, resample it to the training
        spacing (see :meth:`model_shape`) and normalise it as in training.

        Shape:
            ``(t, c, *s)`` -> ``(t, c, *model_shape(s))`` float32 tensor.
        """
        image = np.asarray(image)
        if image.ndim != 2 + self.spatial_dims:
            raise UserError(
                f"{name} has shape {image.shape}; the model expects (t, c, *s) with "
                f"{self.spatial_dims} spatial axes"
            )
        if image.shape[1] != self.in_channels:
            hint = ("; for a colour cine and a grey-scale model pass --grey (predict_file(..., "
                    "grey=True), or clstm4d.data.to_grey)"
                    if image.shape[1] == 3 and self.in_channels == 1 else "")
            raise UserError(
                f"{name} has {image.shape[1]} channel(s) per frame but the model expects "
                f"{self.in_channels} (in_channels){hint}"
            )
        shape = self.model_shape(image.shape[2:], geometry, name, frames=image.shape[0])
        self._check_not_too_small(shape, name)
        image = resample_image(image, shape)
        x = normalize_intensity(image, self.run.config.data.normalize)
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    def _check_not_too_small(self, shape: Sequence[int], name: str) -> None:
        """Refuse a frame so small that the coarsest level of a UNet with instance
        normalisation holds one voxel (no statistics to normalise with)."""
        strides = getattr(self.model, "strides", None)
        if strides is None or self.run.model_spec.options.get("norm", "instance") != "instance":
            return
        from clstm4d.models.unet import total_strides

        roi = self.settings.roi
        total = total_strides(strides, len(shape))
        seen = [int(n) for n in shape]  # whole frames, or windows padded up to the roi
        if roi is not None and any(r < n for r, n in zip(roi, seen, strict=True)):
            seen = [max(n, int(r)) for n, r in zip(seen, roi, strict=True)]
        if np.prod([-(-n // p) for n, p in zip(seen, total, strict=True)]) <= 1:
            raise UserError(
                f"{name}: frames of {'x'.join(map(str, shape))} voxels (at the model's grid) "
                f"are too small for this model: its pooling ({'x'.join(map(str, total))} in "
                "all) leaves one voxel at its coarsest level; it needs more than "
                f"{'x'.join(map(str, total))} voxels along at least one axis")

    # ------------------------------------------------------------------ prediction
    def predict_array(self, image: np.ndarray, geometry: Any = None, *,
                      spacing: float | Sequence[float] | None = None, name: str = "input",
                      return_probs: bool = False, progress: bool = False
                      ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Segment every frame of ``image (t, c, *s)``: a NumPy array in memory, or one read
        with :func:`~clstm4d.data.read_image`.

        Args:
            image: the raw intensities (normalised here as in training).
            geometry: the image's :class:`~clstm4d.data.Geometry` (where the voxels lie):
                when the model was trained at a voxel spacing (``data.spacing``), the image is
                resampled to it, and the probabilities back to the image's grid before the
                labels are taken. ``None``: the image is taken to be at that spacing, unless
                ``spacing`` is given.
            spacing: instead of ``geometry``, for an array: its voxel size per spatial axis
                (in the array's axis order; one number for all), e.g.
                ``predictor.predict_array(cine, spacing=(1.5, 1.5))``.
            name: how errors name this image.
            return_probs: also return the class probabilities ``(t, k, *s)`` float32.
            progress: show the frames done on a terminal (a bar; nothing in a redirected
                log: :class:`~clstm4d.engine.run.progress.Progress`).

        Returns:
            Labels ``(t, *s)`` (``uint8``, or ``int64`` beyond 255 classes) on the image's grid,
            and the probabilities when ``return_probs``.
        """
        if spacing is not None:
            if geometry is not None:
                raise UserError(f"{name}: give geometry or spacing, not both")
            geometry = array_geometry(np.shape(image), spacing, source=name)
        x = self.prepare(image, name, geometry)  # (t, c, *s at the training spacing)
        grid = tuple(np.shape(image)[2:])
        resampled = tuple(x.shape[2:]) != grid
        s = self.settings
        back = None
        if resampled:
            def back(p: torch.Tensor) -> torch.Tensor:
                # one time chunk's probabilities onto the image's grid, frame by frame
                return torch.from_numpy(resample_image(p.numpy(), grid))

        with Progress(len(x), desc=f"predict {name}", unit="frame", enabled=progress,
                      log_lines=False) as bar:  # a bar on a terminal, nothing in a log
            out = predict_sequence(self.model, x, roi=s.roi, overlap=s.overlap, chunk=s.chunk,
                                   time_margin=s.time_margin, sw_batch_size=s.sw_batch_size,
                                   mode=s.mode, device=self.device, amp_dtype=self.amp_dtype,
                                   return_probs=return_probs, chunk_probs=back,
                                   progress=bar.update)
        return (out[0].numpy(), out[1].numpy()) if return_probs else out.numpy()

    def predict_file(self, input: str | os.PathLike | Sequence[str | os.PathLike],
                     output: str | os.PathLike, *, overwrite: bool = False,
                     progress: bool = False, grey: bool = False,
                     **array_options: Any) -> list[Path]:
        """Read a sequence, segment it and write the labels in its format and geometry.

        Args:
            input: one 4D file (NIfTI, TIFF, NumPy), a folder of per-frame files, or their
                list; a DICOM cine (one multi-frame file, or one series: a folder or list).
            output: a file (its extension chooses the format: ``.nii.gz``, ``.nii``, ``.tif``,
                ``.tiff``, converting from the input's when they differ; no extension: the
                input's), or a folder for per-frame series (see :mod:`clstm4d.data.output`).
                Over DICOM input: ``.dcm`` writes a DICOM Segmentation referencing the source
                instances (segments named after the checkpoint's labels), ``.nii.gz`` a NIfTI
                label map.
            overwrite: replace an existing output file (or write into a non-empty output
                folder). An output that is one of the inputs is refused even so.
            progress: show the frames done (see :meth:`predict_array`).
            grey: turn a colour (RGB) image into one luminance channel first
                (:func:`~clstm4d.data.to_grey`), for a grey-scale model on colour cine.
            array_options: NumPy inputs: ``axes``, ``spacing``, ``time_interval`` (see
                :func:`~clstm4d.data.arrays.read_array`).

        Returns:
            The files written.

        Raises:
            UserError: before the prediction, when ``output`` resolves to an input file (or
                a per-frame output would replace an input frame), or exists without
                ``overwrite`` (see :func:`~clstm4d.engine.run.folders.check_label_outputs`).
        """
        paths = [input] if isinstance(input, (str, os.PathLike)) else list(input)
        if not paths:
            raise UserError("no input given")
        for f in paths:
            if not Path(f).exists():
                raise UserError(f"input not found: {f}")
        options = {k: v for k, v in array_options.items() if v is not None}
        image, geometry = read_image(paths[0] if len(paths) == 1 else paths, self.spatial_dims,
                                     **options)
        resolved = check_label_outputs(geometry, output, inputs=paths, overwrite=overwrite)
        if grey:
            image = to_grey(image, str(paths[0]))
        labels = self.predict_array(image, geometry, name=str(paths[0]), progress=progress)
        return write_result(labels, geometry, resolved=resolved, class_names=self.class_names)

    @property
    def class_names(self) -> dict[int, str]:
        """Class value -> name for the classes the model predicts (the checkpoint's labels;
        ``class N`` where it has none)."""
        return {k: self.run.labels.get(k, f"class {k}") for k in range(self.num_classes)}
