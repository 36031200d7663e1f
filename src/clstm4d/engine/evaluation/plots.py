"""Plots: Dice per frame, an overlay montage across frames, and an animated GIF.

Needs the ``plot`` extra (matplotlib for the figures, Pillow for the GIF). 3D volumes are shown
by one slice: the slice along the first spatial axis with the most foreground in the label.

Shape legend: ``t`` frames, ``c`` channels, ``*s`` spatial axes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["overlay_montage", "plot_dice_per_frame", "plot_volumes", "write_gif"]

# class index -> RGB (class 0 = background is not drawn)
PALETTE = np.array([[0, 0, 0], [230, 60, 50], [40, 200, 230], [250, 210, 40], [140, 80, 220],
                    [60, 200, 90], [250, 130, 30], [240, 90, 200]], dtype=np.float32)


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _slice_index(label: np.ndarray | None, image: np.ndarray) -> int | None:
    """For 3D: the index along the first spatial axis with the most foreground."""
    if image.ndim - 2 != 3:
        return None
    if label is not None and (label > 0).any():
        return int((label > 0).sum(axis=(0, 2, 3)).argmax())
    return image.shape[2] // 2


def _frames_2d(image: np.ndarray, maps: Sequence[np.ndarray | None]):
    """Reduce ``image (t, c, *s)`` and label maps ``(t, *s)`` to 2D frames ``(t, h, w)``."""
    image = np.asarray(image, dtype=np.float32)
    ref = next((m for m in maps if m is not None), None)
    z = _slice_index(ref, image)
    img = image[:, 0]
    if z is not None:
        img = img[:, z]
        maps = [None if m is None else np.asarray(m)[:, z] for m in maps]
    if img.ndim == 2:  # 1D+t: show the profile over a few pixels of height
        img = np.repeat(img[:, None, :], 8, axis=1)
        maps = [None if m is None else np.repeat(np.asarray(m)[:, None, :], 8, 1) for m in maps]
    lo, hi = np.percentile(img, [1, 99])
    img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    return img, [None if m is None else np.asarray(m) for m in maps]


def _overlay(gray: np.ndarray, labels: np.ndarray | None, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 ``(h, w, 3)``: a gray image with class colours blended on top."""
    rgb = np.repeat(gray[..., None] * 255.0, 3, axis=-1)
    if labels is not None:
        lab = np.asarray(labels).astype(np.int64)
        colours = PALETTE[np.where(lab > 0, (lab - 1) % (len(PALETTE) - 1) + 1, 0)]
        fg = (lab > 0)[..., None]
        rgb = np.where(fg, (1 - alpha) * rgb + alpha * colours, rgb)
    return rgb.clip(0, 255).astype(np.uint8)


def plot_dice_per_frame(curves: Mapping[str, Sequence[float]], path: str | Path, *,
                        degraded: Sequence[int] = (), title: str = "Dice per frame",
                        ylabel: str = "Dice (mean over foreground classes)",
                        frames: Sequence[int] | None = None) -> Path:
    """Line plot of one Dice curve per model, degraded frames shaded.

    Args:
        curves: model name -> Dice of each frame.
        path: the PNG to write.
        degraded: frame indices to shade.
        frames: the frame index of each value (default 0, 1, ...), for curves scored on
            some frames only.
    """
    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    for f in degraded:
        ax.axvspan(f - 0.5, f + 0.5, color="0.85", lw=0)
    for name, values in curves.items():
        x = np.arange(len(values)) if frames is None else np.asarray(frames)
        ax.plot(x, values, marker="o", ms=3.5, label=name)
    if len(degraded):
        ax.plot([], [], color="0.85", lw=8, label="degraded frame")
    ax.set_xlabel("frame")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_volumes(rows: Sequence[Mapping[str, float]], class_names: Sequence[str],
                 path: str | Path) -> Path:
    """Segmented volume per frame and class, prediction vs label (from evaluation rows)."""
    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    frames = [r["frame"] for r in rows]
    for j, name in enumerate(class_names):
        colour = PALETTE[(j % (len(PALETTE) - 1)) + 1] / 255
        ax.plot(frames, [r[f"label_volume_{name}"] for r in rows], color=colour, ls="--",
                label=f"{name} (label)")
        ax.plot(frames, [r[f"volume_{name}"] for r in rows], color=colour, marker="o", ms=3,
                label=f"{name} (prediction)")
    ax.set_xlabel("frame")
    ax.set_ylabel("volume")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def overlay_montage(image, label, preds: Mapping[str, np.ndarray], path: str | Path, *,
                    frames: Sequence[int] | None = None, degraded: Sequence[int] = (),
                    max_frames: int = 10) -> Path:
    """Rows: image, label, then each prediction (overlaid on the image); columns: frames.

    Args:
        image: ``(t, c, *s)``; label: ``(t, *s)`` or None; preds: name -> ``(t, *s)``.
        frames: which frames to show (default: up to ``max_frames`` evenly spaced, always
            including the degraded ones).
        degraded: frames whose column title is marked.
    """
    plt = _matplotlib()
    t = np.asarray(image).shape[0]
    if frames is None:
        frames = list(range(t)) if t <= max_frames else sorted(
            set(np.linspace(0, t - 1, max_frames - len(degraded)).round().astype(int).tolist())
            | {int(c) for c in degraded})
    names = ["image", "label", *preds]
    gray, maps = _frames_2d(image, [label, *preds.values()])
    fig, axes = plt.subplots(len(names), len(frames), squeeze=False,
                             figsize=(1.5 * len(frames), 1.55 * len(names)), dpi=100)
    for i, name in enumerate(names):
        for j, f in enumerate(frames):
            ax = axes[i, j]
            lab = None if i == 0 else maps[i - 1]
            ax.imshow(_overlay(gray[f], None if lab is None else lab[f]))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                mark = " (degraded)" if f in set(degraded) else ""
                ax.set_title(f"t={f}{mark}", fontsize=7, color="red" if mark else "black")
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.tight_layout(pad=0.3)
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_gif(image, label, preds: Mapping[str, np.ndarray], path: str | Path, *,
              degraded: Sequence[int] = (), scale: int = 3, ms_per_frame: int = 350) -> Path:
    """An animated GIF: per frame, panels image | label | each prediction side by side.

    Args:
        image: ``(t, c, *s)``; label: ``(t, *s)`` or None; preds: name -> ``(t, *s)``.
        scale: integer upscaling of every panel.
        degraded: frames marked "degraded" in the caption.
    """
    from PIL import Image, ImageDraw

    gray, maps = _frames_2d(image, [label, *preds.values()])
    titles = ["image", "label", *preds]
    panels_maps = [None, *maps]
    frames_out = []
    for f in range(gray.shape[0]):
        panels = [_overlay(gray[f], None if m is None else m[f]) for m in panels_maps]
        panels = [np.kron(p, np.ones((scale, scale, 1), np.uint8)) for p in panels]
        h, w = panels[0].shape[:2]
        canvas = np.full((h + 16, (w + 4) * len(panels), 3), 255, np.uint8)
        for i, p in enumerate(panels):
            canvas[16:, i * (w + 4): i * (w + 4) + w] = p
        im = Image.fromarray(canvas)
        draw = ImageDraw.Draw(im)
        for i, name in enumerate(titles):
            text = name if i else f"t={f}" + (" degraded" if f in set(degraded) else "")
            draw.text((i * (w + 4) + 2, 2), text,
                      fill=(200, 0, 0) if (i == 0 and f in set(degraded)) else (0, 0, 0))
        frames_out.append(im.convert("P", palette=Image.Palette.ADAPTIVE, colors=255))
    path = Path(path)
    frames_out[0].save(path, save_all=True, append_images=frames_out[1:], duration=ms_per_frame,
                       loop=0, optimize=False)
    return path
