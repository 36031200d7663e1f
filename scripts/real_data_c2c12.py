"""Real-data example: a C2C12 time-lapse trained with a few annotated frames.

REAL DATA (not synthetic): 10 phase-contrast frames (234x234) of C2C12 myoblasts with a mask
per frame, from Ker et al., "Phase contrast time-lapse microscopy datasets with automated and
manual cell tracking annotations", Scientific Data 5, 180237 (2018),
doi:10.1038/sdata.2018.237 (CC BY 4.0), in the subset
`docs/examples/cell_segmentation_data/data_small.npz` of the repository yfukai/laptrack. The
file is not part of clstm4d: pass its path (``--npz``, or ``CLSTM4D_C2C12``).

What it does, through the ``clstm4d`` command: writes the sequence as ImageJ TIFF hyperstacks
(image and cell mask, ``labels > 0``) and a datalist whose one entry declares only
``--labelled`` frames annotated; trains the time-resolved UNet and the per-frame network on
it; predicts every frame; and evaluates on the annotated frames (what training saw) and on the
other frames (never seen as labels). One sequence of 10 frames is far too little to claim
accuracy: this shows the path from real files to per-frame scores, nothing more.

    python scripts/real_data_c2c12.py --npz ../shared/data/c2c12/c2c12_phase_10frames.npz \\
        --out c2c12_out --labelled 0,5 --steps 300

Prints one line per model and writes ``OUT/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_NPZ = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "c2c12" / \
    "c2c12_phase_10frames.npz"
MODELS = {"temporal": "bottleneck", "per-frame": "none"}


def prepare(npz: Path, out: Path, labelled: list[int]) -> Path:
    """TIFF hyperstacks + datalist; returns the datalist path."""
    from clstm4d.data import Geometry, save_datalist, write_image, write_label

    data = np.load(npz)
    images, masks = data["images"], (data["labels"] > 0).astype(np.int64)  # (t, y, x)
    geometry = Geometry.default("tiff", images.shape[1:], images.shape[0], space_unit=None,
                                time_unit=None)
    image_path = write_image(images[:, None].astype(np.float32), geometry,
                             out / "data" / "c2c12.tif")[0]
    mask_path = write_label(masks, geometry, out / "data" / "c2c12_mask.tif")[0]
    return save_datalist(out / "data" / "datalist.json", labels={0: "background", 1: "cell"},
                         spatial_dims=2, training=[{"name": "c2c12", "image": image_path,
                                                    "label": mask_path,
                                                    "labelled_frames": labelled}],
                         description="C2C12 (Ker et al. 2018, CC BY 4.0) via yfukai/laptrack")


def main(argv: list[str] | None = None) -> int:
    from clstm4d.cli import main as clstm4d

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--npz", default=os.environ.get("CLSTM4D_C2C12", str(DEFAULT_NPZ)))
    p.add_argument("--out", default="c2c12_out")
    p.add_argument("--labelled", default="0,5", help="annotated frames, e.g. 0,5")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    npz, out = Path(args.npz), Path(args.out)
    if not npz.is_file():
        print(f"real_data_c2c12: {npz} not found (pass --npz or set CLSTM4D_C2C12)",
              file=sys.stderr)
        return 2
    labelled = [int(f) for f in args.labelled.split(",")]
    datalist = prepare(npz, out, labelled)
    others = ",".join(str(f) for f in range(10) if f not in labelled)
    mask = out / "data" / "c2c12_mask.tif"
    summary = {"labelled_frames": labelled, "steps": args.steps, "models": {}}
    for name, temporal in MODELS.items():
        t0 = time.perf_counter()
        run = out / "runs" / name
        rc = clstm4d(["train", "--datalist", str(datalist), "--out", str(run), "--steps",
                      str(args.steps), "--batch-size", "2", "--lr", "3e-3",
                      "--set", f"model.temporal={temporal}", "--set", "data.window=10",
                      "--set", "data.roi=[96, 96]", "--set", "data.foreground_prob=0.8",
                      "--set", "train.progress=false", "--set", f"train.threads={args.threads}",
                      "--set", "train.warmup_steps=15", "--overwrite"])
        if rc:
            return rc
        pred = out / f"pred_{name}.tif"
        rc = clstm4d(["predict", "--checkpoint", str(run), "--input",
                      str(out / "data" / "c2c12.tif"), "--output", str(pred), "--overwrite"])
        if rc:
            return rc
        scores = {}
        for which, frames in (("annotated", args.labelled), ("other", others)):
            ev = out / f"eval_{name}_{which}"
            rc = clstm4d(["evaluate", "--pred", str(pred), "--label", str(mask), "--frames",
                          frames, "--out", str(ev), "--num-classes", "2", "--overwrite"])
            if rc:
                return rc
            scores[which] = json.loads((ev / "summary.json").read_text())["dice"]
        summary["models"][name] = {**scores, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name:<10} Dice annotated frames {scores['annotated']:.3f}  other frames "
              f"{scores['other']:.3f}  ({summary['models'][name]['seconds']:.0f} s)")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
