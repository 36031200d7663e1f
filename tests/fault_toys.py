"""Fault injection for the training tests: a dataset that misbehaves on given calls.

Not a test module; also run as a script (alone or under ``torchrun``) by the fault tests:
``python tests/fault_toys.py OUT STEPS [--signal-at CALL] [--die-at CALL] [--hang-at CALL]
[--rank R] [--timeout S] [--checkpoint-every N]`` trains the toy model of ``engine_toys``
and writes ``OUT/result{rank}.json`` (how the run ended, and at which step).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine_toys import ToySequences, ToyTemporalNet  # noqa: E402


class Faulty(torch.utils.data.Dataset):
    """Wraps a dataset; counts ``__getitem__`` calls (1-based) and injects faults on some.

    Args:
        dataset: the wrapped dataset.
        nan_from: from this call on, images are NaN (None: never).
        nan_calls: calls whose image is NaN.
        signal_at: ``{call: signal number}`` sent to this process at that call.
        die_at: the call at which this process ends at once (``os._exit``), like a crashed
            or killed rank.
        hang_at: the call at which this process stops (SIGSTOP), like a hung rank.
    """

    def __init__(self, dataset, nan_from=None, nan_calls=(), signal_at=None, die_at=None,
                 hang_at=None):
        self.dataset, self.nan_from, self.nan_calls = dataset, nan_from, set(nan_calls)
        self.signal_at, self.die_at, self.hang_at = dict(signal_at or {}), die_at, hang_at
        self.calls = 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.calls += 1
        item = dict(self.dataset[i])
        if self.calls in self.nan_calls or (self.nan_from and self.calls >= self.nan_from):
            item["image"] = torch.full_like(item["image"], float("nan"))
        if self.calls in self.signal_at:
            os.kill(os.getpid(), self.signal_at[self.calls])
        if self.die_at is not None and self.calls >= self.die_at:
            os._exit(17)
        if self.hang_at is not None and self.calls == self.hang_at:
            os.kill(os.getpid(), signal.SIGSTOP)
        return item


def toy_config(out, steps, **kw):
    from clstm4d.engine.run.config import TrainConfig

    base = dict(out=str(out), steps=steps, lr=1e-2, warmup_steps=2, log_every=1,
                progress=False, device="cpu", seed=1, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def main(argv=None) -> int:
    from clstm4d.engine.training.loop import fit
    from clstm4d.errors import Preempted

    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("steps", type=int)
    p.add_argument("--signal-at", type=int, default=None, help="call that gets SIGTERM")
    p.add_argument("--die-at", type=int, default=None, help="call at which this rank dies")
    p.add_argument("--hang-at", type=int, default=None, help="call at which this rank hangs")
    p.add_argument("--rank", type=int, default=None, help="only this rank misbehaves")
    p.add_argument("--timeout", type=float, default=None, help="train.dist_timeout")
    p.add_argument("--checkpoint-every", type=int, default=0, help="train.checkpoint_every")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    mine = args.rank is None or args.rank == rank
    data = Faulty(ToySequences(),
                  signal_at={args.signal_at: signal.SIGTERM} if mine and args.signal_at else None,
                  die_at=args.die_at if mine else None, hang_at=args.hang_at if mine else None)
    torch.manual_seed(0)
    cfg = toy_config(args.out, args.steps, checkpoint_every=args.checkpoint_every,
                     **({"dist_timeout": args.timeout} if args.timeout else {}))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"rank": rank, "pid": os.getpid()}
    try:
        res = fit(ToyTemporalNet(), data, cfg, batch_size=2,
                  saved_config={"model": {"name": "toy"}})
        result.update(outcome="done", step=res.steps)
        code = 0
    except Preempted as e:
        result.update(outcome="preempted", step=e.step, signal=e.signal,
                      checkpoint=None if e.checkpoint is None else str(e.checkpoint))
        code = 75
    except Exception as e:  # a lost rank: the error this rank saw
        result.update(outcome="error", error=f"{type(e).__name__}: {e}"[:500])
        code = 1
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun's clean-up: let the result out
    (out / f"result{rank}.json").write_text(json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(main())
