"""Faults under DistributedDataParallel (gloo on CPU, two processes): a signal to one rank, a
rank that dies. Every rank must stop at the same step, or fail within a bounded time."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clstm4d.engine.run.checkpoint import Checkpoint

TESTS = Path(__file__).parent
SCRIPT = str(TESTS / "fault_toys.py")
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and launcher")


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)]),
            "OMP_NUM_THREADS": "1"}


def _results(out):
    return [json.loads((out / f"result{r}.json").read_text()) for r in (0, 1)]


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    out = tmp_path / "run"
    # rank 1 alone gets SIGTERM while loading its 7th sample (batch 2: the batch of step 4)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0",
         SCRIPT, str(out), "1000", "--signal-at", "7", "--rank", "1"],
        env=_env(), capture_output=True, text=True, timeout=240)
    r0, r1 = _results(out)
    assert r0["outcome"] == r1["outcome"] == "preempted", proc.stderr[-3000:]
    assert r0["step"] == r1["step"] == 4
    assert r1["signal"] == "SIGTERM" and r0["signal"] is None  # rank 0 was told by rank 1
    ck = Checkpoint.open(out).path
    assert r0["checkpoint"] == str(ck) and Checkpoint.open(ck).state["step"] == 4
    assert r1["checkpoint"] is None  # only rank 0 writes
    # torchrun reports a worker exit code other than 0 as a failure of the job (it exits 1)
    assert proc.returncode != 0 and "exitcode  : 75" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_sigterm_to_every_process_as_slurm_sends_it(tmp_path):
    """The whole process group (torchrun's agent too, which forwards SIGTERM to the workers a
    second time) is signalled: every rank still finishes the same step and rank 0 writes it."""
    import signal

    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0",
         SCRIPT, str(out), "100000", "--checkpoint-every", "1000"], env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (
            metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=120)
    r0, r1 = _results(out)
    assert r0["outcome"] == r1["outcome"] == "preempted" and r0["step"] == r1["step"] >= 3
    assert r0["signal"] == r1["signal"] == "SIGTERM"
    assert Checkpoint.open(out).state["step"] == r0["step"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fault", ["dies", pytest.param("hangs", marks=pytest.mark.slow)])
def test_a_lost_rank_makes_the_other_fail_within_the_timeout(tmp_path, fault):
    """No torchrun agent to clean up: the surviving rank must notice on its own, at once when
    the other process is gone (its sockets close), after train.dist_timeout when it hangs."""
    out = tmp_path / "run"
    port = _free_port()
    timeout = 10
    procs = []
    for rank in (0, 1):
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(
            [sys.executable, SCRIPT, str(out), "1000", f"--{fault[:-1]}-at", "7", "--rank", "1",
             "--timeout", str(timeout), "--checkpoint-every", "2"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    metrics, t_lost, t_start = out / "metrics.jsonl", None, time.monotonic()
    try:
        deadline = time.monotonic() + 180
        while not (out / "result0.json").exists() and time.monotonic() < deadline:
            if t_lost is None and ((metrics.exists() and len(metrics.read_text().splitlines())
                                    >= 3) or procs[1].poll() is not None):
                t_lost = time.monotonic()  # step 3 done (or rank 1 gone): lost in step 4
            time.sleep(0.05)
        code0 = procs[0].wait(timeout=60)
        # rank 0 may fail between two polls of the loss: then time from the start (an upper
        # bound, so the check below only gets stricter)
        waited = time.monotonic() - (t_start if t_lost is None else t_lost)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    if fault == "dies":
        assert procs[1].returncode == 17  # it died as told (os._exit)
    r0 = json.loads((out / "result0.json").read_text())
    assert code0 == 1 and r0["outcome"] == "error", r0
    # gone: noticed at once (its sockets closed); hung: the collective gave up after
    # train.dist_timeout, not PyTorch's default 30 minutes
    assert waited < 3 * timeout, waited
    print(f"rank 0 failed {waited:.1f} s after rank 1 {fault[:-1]}: {r0['error'][:120]}")
    # what survived: the last periodic checkpoint, valid; the run folder is unlocked
    assert Checkpoint.open(out).path.name == "step_000002"
    assert not (out / ".clstm4d.lock").exists()
