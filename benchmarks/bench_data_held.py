"""The process model over a whole run, not only its first steps: many training cases, enough
steps that most of them are sampled, validation at the end, all through the CLI in fresh
processes. A `train` that held each case twice once sampled (as loaded and normalised) grew
by the images' size over the first epoch, beyond the model's data term; this prints the
logged peak after the first and the last step next to the prediction, and their ratio.

    python benchmarks/bench_data_held.py --work /tmp/once     # about 2 minutes here

(docs/benchmarks.md, "The data over the whole run").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def clstm4d(*argv: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "clstm4d", *argv], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=None, help="folder for the data and the run")
    p.add_argument("--cases", type=int, default=40, help="cases (a quarter for validation)")
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_data_held_"))
    data = work / "data"
    if not (data / "datalist.json").is_file():
        clstm4d("synth", "--out", str(data), "--dims", "3", "--cases", str(args.cases),
                "--frames", "6", "--size", "64", "--seed", "0")
    run = work / "run"
    clstm4d("train", "--datalist", str(data / "datalist.json"), "--out", str(run), "--steps",
            str(args.steps), "--overwrite", "--set", "data.roi=[32,32,32]", "--set",
            "data.window=4", "--set", "data.batch_size=2", "--set", "train.amp=none", "--set",
            "train.device=cpu", "--set", "train.progress=false")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for r in (r for r in rows if "peak_mb" in r):
        print(json.dumps({"bench": "data_held", "step": r["step"], "peak_mb": r["peak_mb"],
                          "predicted_peak_mb": r["predicted_peak_mb"],
                          "ratio": round(r["predicted_peak_mb"] / r["peak_mb"], 3)}))


if __name__ == "__main__":
    main()
