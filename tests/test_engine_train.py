"""The training loop on its own (toy model and data): exact resume, DDP == one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clstm4d.engine.run.checkpoint import Checkpoint
from clstm4d.engine.run.config import TrainConfig
from clstm4d.engine.run.folders import RunFolder
from clstm4d.engine.training.loop import fit
from clstm4d.engine.training.sampling import EpochStream, StepBatchSampler

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from engine_toys import ToySequences, ToyTemporalNet  # noqa: E402


def _cfg(out, steps, **kw):
    base = dict(out=str(out), steps=steps, lr=1e-2, warmup_steps=2, log_every=1,
                progress=False, device="cpu", seed=1)
    base.update(kw)
    return TrainConfig(**base)


def _losses(out):
    return [json.loads(x)["loss"] for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_resume_continues_exactly(tmp_path):
    # dropout > 0 so that the RNG state has to be restored too
    torch.manual_seed(0)
    full = ToyTemporalNet(dropout=0.3)
    fit(full, ToySequences(), _cfg(tmp_path / "full", 6), batch_size=2)

    torch.manual_seed(0)
    part = ToyTemporalNet(dropout=0.3)
    fit(part, ToySequences(), _cfg(tmp_path / "part", 6, checkpoint_every=3), batch_size=2,
        saved_config={"model": {"name": "toy"}})
    # pretend the run stopped after step 3: resume from that checkpoint in a fresh model
    ck = tmp_path / "part" / "checkpoints" / "step_000003"
    assert Checkpoint.open(ck).state["step"] == 3
    torch.manual_seed(123)  # a different global RNG state must not matter
    resumed = ToyTemporalNet(dropout=0.3)
    fit(resumed, ToySequences(), _cfg(tmp_path / "resumed", 6), batch_size=2,
        folder=RunFolder(tmp_path / "resumed", resume=ck))

    full_losses = _losses(tmp_path / "full")
    assert _losses(tmp_path / "resumed") == full_losses[3:]
    assert len(full_losses) == 6
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_checkpoint_roundtrip_and_latest(tmp_path):
    torch.manual_seed(0)
    net = ToyTemporalNet()
    res = fit(net, ToySequences(), _cfg(tmp_path, 2), batch_size=2, saved_config={"a": (1, 2)})
    assert Checkpoint.open(tmp_path).path == res.checkpoint
    other = ToyTemporalNet()
    Checkpoint.open(tmp_path).load_weights(other)
    for a, b in zip(net.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not list((tmp_path / "checkpoints").glob(".*tmp"))  # no temporary leftovers
    umask = os.umask(0)
    os.umask(umask)  # written atomically, yet with the permissions of a plain open/mkdir
    assert res.checkpoint.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "checkpoints" / "latest.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert json.loads((res.checkpoint / "config.json").read_text())["a"] == {"__tuple__": [1, 2]}


def test_sampler_ranks_split_the_global_batch():
    single = list(StepBatchSampler(7, 4, steps=5, seed=2))
    r0 = list(StepBatchSampler(7, 2, steps=5, seed=2, rank=0, world_size=2))
    r1 = list(StepBatchSampler(7, 2, steps=5, seed=2, rank=1, world_size=2))
    assert [a + b for a, b in zip(r0, r1, strict=True)] == single
    # every epoch is a permutation: each block of 7 positions covers the dataset once
    stream = EpochStream(list(range(7)), seed=2)
    flat = [stream[p] for b in single for p in b]
    assert sorted(flat[:7]) == sorted(flat[7:14]) == list(range(7))
    assert flat[:7] != flat[7:14]


@pytest.mark.skipif(sys.platform == "win32", reason="gloo test uses a POSIX launcher")
def test_ddp_two_processes_match_single_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)]),
           "OMP_NUM_THREADS": "1"}
    script = str(TESTS / "engine_toys.py")
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0",
         script, str(tmp_path / "ddp"), "2", "3"],
        check=True, env=env, capture_output=True, timeout=240,
    )
    subprocess.run([sys.executable, script, str(tmp_path / "one"), "4", "3"],
                   check=True, env=env, capture_output=True, timeout=120)
    from safetensors.torch import load_file

    r0 = load_file(str(tmp_path / "ddp" / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "ddp" / "rank1.safetensors"))
    one = load_file(str(tmp_path / "one" / "rank0.safetensors"))
    for k in one:
        assert torch.equal(r0[k], r1[k]), k
        torch.testing.assert_close(r0[k], one[k], rtol=1e-4, atol=1e-5)
    # rank 0 alone logs and checkpoints
    assert (tmp_path / "ddp" / "metrics.jsonl").exists()
    assert Checkpoint.open(tmp_path / "ddp").path.name == "step_000003"
