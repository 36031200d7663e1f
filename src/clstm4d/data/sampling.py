"""Patch sampling in space x time for training.

Shape legend: ``t`` frames, ``c`` channels, ``s`` / ``*s`` spatial axes, ``roi`` patch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from clstm4d._common import per_axis

from ._common import DataError
from .datalist import Case, CaseData, load_case
from .transforms import NORMALIZATIONS, Augment, Degrade, normalize_intensity

__all__ = ["PatchDataset", "crop_or_pad"]


def crop_or_pad(array: np.ndarray, start: Sequence[int], size: Sequence[int],
                lead: int) -> np.ndarray:
    """Take ``array[..., start:start+size]`` over the last axes, zero-padding outside.

    Args:
        array: ``(*lead_axes, *s)`` with ``lead`` leading axes left alone.
        start: first index per spatial axis (may be negative or run past the end).
        size: patch size per spatial axis.

    Examples:
        >>> crop_or_pad(np.arange(4).reshape(1, 4), [-1], [6], lead=1)
        array([[0, 0, 1, 2, 3, 0]])
    """
    out = np.zeros(array.shape[:lead] + tuple(size), array.dtype)
    src, dst = [slice(None)] * lead, [slice(None)] * lead
    for n, s0, k in zip(array.shape[lead:], start, size, strict=True):
        a, b = max(s0, 0), min(s0 + k, n)
        src.append(slice(a, max(a, b)))
        dst.append(slice(a - s0, a - s0 + max(0, b - a)))
    out[tuple(dst)] = array[tuple(src)]
    return out


def _transform(name: str, value: Any, cls: type) -> Any:
    """``True`` -> ``cls()``, a dict -> ``cls(**dict)``, ``False``/``None`` -> None."""
    if value is True:
        return cls()
    if isinstance(value, dict):
        return cls(**value)
    if value is None or value is False or isinstance(value, cls):
        return value or None
    raise TypeError(f"PatchDataset: {name} must be a bool, a dict of {cls.__name__} arguments "
                    f"or a {cls.__name__} object, got {type(value).__name__}")


class PatchDataset(Dataset):
    """Windows of frames x spatial patches from a list of cases (a torch ``Dataset``).

    Item ``i`` takes case ``i % len(cases)`` and draws a window start and a crop from a
    generator seeded with ``(seed, epoch, i)``: the same index gives the same patch until
    :meth:`set_epoch` changes the epoch. The crop is the same for every frame of the window.

    Sparse annotations (``CaseData.labelled``): the window start is drawn uniformly among the
    starts whose window holds at least one annotated frame, and foreground-centred crops look
    only at the annotated frames of the window; padding frames are never annotated. Nothing
    here reads the label of a frame that is not annotated, so its content cannot change an
    item's ``image``, ``start``, crop or ``labelled``.

    Args:
        cases: :class:`Case` (loaded on first use and cached) or :class:`CaseData`.
        window: frames per item; ``None`` = the whole sequence. Shorter sequences are padded
            with zero frames (label 0) at the end, and ``length`` says how many are real.
        roi: spatial patch size (int or one per axis); ``None`` = the whole extent. Cases
            smaller than the roi are zero-padded.
        foreground_prob: probability that the patch is centred on a random foreground voxel
            (label > 0, not ``ignore_index``) of an annotated frame of the window instead of
            a uniform position.
        seed: base seed.
        augment: ``True`` (default :class:`Augment`), an :class:`Augment`, a dict of its
            keyword arguments, or ``False``/``None``.
        normalize: ``"percentile"`` (default), ``"zscore"`` or ``None``; per case (see
            :func:`normalize_intensity`).
        samples_per_case: items per case per epoch.
        degrade: degrade random frames of the image (after ``augment``; labels untouched):
            ``True`` (default :class:`Degrade`), a :class:`Degrade`, a dict of its keyword
            arguments, or ``False``/``None``. Degraded frames are marked in ``degraded``.
            Occluders are placed over the foreground of annotated frames only.
        ignore_index: the value of the ``"ignore"`` class (never a crop centre), or ``None``.
        reverse_time: probability that a window is played backwards (its frames, labels,
            annotated and degraded flags in reverse order; ``start`` stays the first frame in
            the file). For data whose changes run both ways (cells that grow and shrink,
            appear and leave), so that a model does not learn from forward-only training
            that foreground persists; not for tasks with an order (a cue at the start).

    Raises:
        DataError: (on first use of the case) a case without any annotated frame: no window
            of it could hold one.

    Shape:
        Items are dicts: ``image (t_win, c, *roi)`` float32 tensor, ``label (t_win, *roi)``
        int64 tensor, ``labelled (t_win,)`` bool tensor (annotated frames; False for
        padding), ``length`` int, ``start`` int (first frame), ``degraded (t_win,)`` bool
        tensor (``meta["degraded"]`` and the frames ``degrade`` degraded), ``case`` str.

    Examples:
        >>> from clstm4d.data import make_synthetic_case
        >>> cases = [make_synthetic_case(seed=s, frames=6, size=32) for s in range(2)]
        >>> ds = PatchDataset(cases, window=8, roi=16, foreground_prob=1.0, seed=0)
        >>> item = ds[0]
        >>> tuple(item["image"].shape), tuple(item["label"].shape), item["length"]
        ((8, 1, 16, 16), (8, 16, 16), 6)
        >>> bool((item["label"] > 0).any()), bool((ds[0]["image"] == item["image"]).all())
        (True, True)
        >>> item["labelled"].tolist()  # 6 real frames, all annotated, then 2 of padding
        [True, True, True, True, True, True, False, False]
    """

    def __init__(self, cases: Sequence[Case | CaseData], window: int | None = None,
                 roi: int | Sequence[int] | None = None, foreground_prob: float = 0.0,
                 seed: int = 0, augment: bool | Augment | None = False,
                 normalize: str | None = "percentile", samples_per_case: int = 1,
                 degrade: bool | Degrade | dict | None = None,
                 ignore_index: int | None = None, reverse_time: float = 0.0):
        if not cases:
            raise ValueError("PatchDataset: cases must not be empty")
        for c in cases:
            if not isinstance(c, (Case, CaseData)):
                raise TypeError(f"PatchDataset: cases must be Case or CaseData, got "
                                f"{type(c).__name__}")
        if window is not None and window < 1:
            raise ValueError(f"PatchDataset: window must be >= 1 or None, got {window}")
        sizes = [] if roi is None else [roi] if np.ndim(roi) == 0 else list(roi)
        if roi is not None and (not sizes or any(
                isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1
                for r in sizes)):
            raise ValueError(f"PatchDataset: roi must be a positive int or one per spatial "
                             f"axis, got {roi!r}")
        if not 0 <= foreground_prob <= 1:
            raise ValueError(f"PatchDataset: foreground_prob must be in [0, 1], got "
                             f"{foreground_prob}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"PatchDataset: normalize must be one of {NORMALIZATIONS}, got "
                             f"{normalize!r}")
        if not 0 <= reverse_time <= 1:
            raise ValueError(f"PatchDataset: reverse_time must be in [0, 1], got {reverse_time}")
        if samples_per_case < 1:
            raise ValueError(f"PatchDataset: samples_per_case must be >= 1, got "
                             f"{samples_per_case}")
        self.degrade = _transform("degrade", degrade, Degrade)
        self.cases = list(cases)
        self.window = window
        self.roi = roi
        self.foreground_prob = foreground_prob
        self.seed = seed
        self.augment = _transform("augment", augment, Augment)
        self.normalize = normalize
        self.samples_per_case = samples_per_case
        self.ignore_index = ignore_index
        self.reverse_time = reverse_time
        self.epoch = 0
        self._cache: dict[int, CaseData] = {}
        self._fg_cache: dict[int, list[np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.cases) * self.samples_per_case

    def set_epoch(self, epoch: int) -> None:
        """Draw different windows/crops/augmentations for a new epoch (deterministically)."""
        self.epoch = int(epoch)

    def case_data(self, index: int) -> CaseData:
        """The loaded, normalised case ``index`` (cached)."""
        if index not in self._cache:
            c = self.cases[index]
            data = load_case(c) if isinstance(c, Case) else c
            name = data.name or getattr(c, "name", f"case{index}")
            if not data.labelled.any():
                raise DataError(f"no annotated frame (labelled is all False, {len(data.labelled)}"
                                f" frames): expected at least one, so that a training window "
                                f"of {self.window or 'all'} frames can hold one", case=name)
            image = normalize_intensity(data.image, self.normalize)
            self._cache[index] = CaseData(image, data.label, data.geometry, data.meta, name,
                                          data.labelled)
            if isinstance(c, CaseData):  # hold the normalised case only, not both
                self.cases[index] = self._cache[index]
        return self._cache[index]

    def prepare(self) -> None:
        """Load and normalise every case now rather than on first use (``train`` does, so
        that its steps take their steady time from the first, a case without annotations
        stops the run before it starts, and a case given in memory is held once: the
        normalised copy replaces it here, and the raw image is freed when nobody else holds
        it)."""
        for index in range(len(self.cases)):
            self.case_data(index)

    def _foreground(self, index: int) -> list[np.ndarray]:
        """Flat indices of the foreground voxels of each annotated frame of case ``index``
        (empty for frames that are not annotated; cached)."""
        if index not in self._fg_cache:
            data = self.case_data(index)
            out = []
            for frame, annotated in zip(data.label, data.labelled, strict=True):
                fg = (frame > 0) & (frame != self.ignore_index if self.ignore_index is not None
                                    else True)
                out.append(np.flatnonzero(fg) if annotated else np.zeros(0, np.int64))
            self._fg_cache[index] = out
        return self._fg_cache[index]

    def _roi(self, spatial_shape):
        d = len(spatial_shape)
        if self.roi is None:
            return tuple(spatial_shape)
        try:
            return per_axis("roi", self.roi, d, "PatchDataset")
        except (TypeError, ValueError):
            raise ValueError(f"PatchDataset: roi must be a positive int or {d} of them for "
                             f"spatial shape {tuple(spatial_shape)}, got {self.roi!r}") from None

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"PatchDataset index {index} out of range [0, {len(self)})")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        data = self.case_data(index % len(self.cases))
        image, label = data.image, data.label
        t, spatial = image.shape[0], image.shape[2:]
        window = t if self.window is None else self.window
        start = 0
        if t > window:  # the starts whose window holds an annotated frame
            starts = np.flatnonzero(np.convolve(data.labelled, np.ones(window), "valid") > 0)
            start = int(starts[rng.integers(0, len(starts))])
        length = min(window, t - start)
        frames = slice(start, start + length)
        roi = self._roi(spatial)
        corner = None
        if self.foreground_prob > 0 and rng.random() < self.foreground_prob:
            fg = self._foreground(index % len(self.cases))[frames]  # flat indices per frame
            counts = np.array([len(f) for f in fg])
            if counts.sum():
                # a uniform draw over all foreground voxels of the window
                k = int(rng.integers(counts.sum()))
                frame = int(np.searchsorted(np.cumsum(counts), k, side="right"))
                flat = fg[frame][k - (counts[:frame].sum())]
                voxel = np.unravel_index(flat, spatial)
                corner = [int(v) - r // 2 for v, r in zip(voxel, roi, strict=True)]
                corner = [min(max(c, 0), n - r) if n >= r else -((r - n) // 2)
                          for c, n, r in zip(corner, spatial, roi, strict=True)]
        if corner is None:
            corner = [int(rng.integers(0, n - r + 1)) if n > r else -((r - n) // 2)
                      for n, r in zip(spatial, roi, strict=True)]
        img = crop_or_pad(image[frames], corner, roi, lead=2)  # (length, c, *roi)
        lab = crop_or_pad(label[frames], corner, roi, lead=1)  # (length, *roi)
        labelled = np.zeros(window, bool)
        labelled[:length] = data.labelled[frames]
        backwards = self.reverse_time > 0 and rng.random() < self.reverse_time
        if backwards:  # the window played backwards (padding stays at the end)
            img, lab, labelled[:length] = img[::-1], lab[::-1], labelled[:length][::-1]
        if self.augment is not None:
            img, lab = self.augment(img, lab, rng)
        degraded = np.zeros(window, bool)
        if self.degrade is not None:  # unannotated frames' labels must not steer it
            seen = lab * labelled[:length].reshape(-1, *(1,) * (lab.ndim - 1))
            img, degraded[:length] = self.degrade(img, seen, rng)
        if length < window:  # pad frames at the end
            img = np.concatenate([img, np.zeros((window - length, *img.shape[1:]), img.dtype)])
            lab = np.concatenate([lab, np.zeros((window - length, *lab.shape[1:]), lab.dtype)])
        for f in data.meta.get("degraded", []):
            if start <= f < start + length:
                degraded[start + length - 1 - f if backwards else f - start] = True
        # fresh C-order copies: numpy calls a flipped axis of size 1 contiguous and keeps its
        # negative stride, which torch refuses (a 1-voxel roi flipped, a 1-frame window reversed)
        return {"image": torch.from_numpy(np.array(img, dtype=np.float32, order="C")),
                "label": torch.from_numpy(np.array(lab, dtype=np.int64, order="C")),
                "labelled": torch.from_numpy(labelled),
                "length": length, "start": start, "degraded": torch.from_numpy(degraded),
                "case": data.name}
