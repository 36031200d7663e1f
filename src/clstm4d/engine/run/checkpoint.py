"""Checkpoints: safetensors tensors plus JSON config and state, written atomically, and the
:class:`Checkpoint` that opens one (resolved and verified once) and hands out what it holds.

A checkpoint is a directory::

    step_000100/
      model.safetensors      model weights
      optimizer.safetensors  optimizer tensors (absent for weights-only checkpoints)
      rng.safetensors        torch RNG states (CPU and every CUDA device)
      config.json            the resolved configuration (with the model's own ``config``)
      state.json             step, optimizer/scheduler scalars, numpy/python RNG, metrics
      checksums.json         the sha256 of every other file, recorded as it was written

Loading never unpickles anything: only ``safetensors`` and ``json`` are read. Every
checkpoint is written into a temporary sibling directory and renamed into place, and the
``latest.json`` pointer is replaced atomically afterwards, so a crash (or a full disk) leaves
either the old or the new checkpoint, never a half-written one.

``state.json`` carries the format version (:data:`FORMAT_VERSION`); a checkpoint of a newer
format is refused with a message. :meth:`Checkpoint.open` checks a checkpoint before use
(:func:`verify_checkpoint`: every file's sha256 against ``checksums.json``, so a single
flipped bit is found; JSON complete, safetensors headers intact and covering their files);
given a run folder, it falls back from a damaged newest checkpoint to the newest valid one and
says so in a warning. Checkpoints written before checksums were recorded (no
``checksums.json``, and ``state.json`` does not promise one) are checked without them.

Examples:
    >>> import tempfile, torch
    >>> net = torch.nn.Linear(2, 3)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = save_checkpoint(d, net, step=5, config={"model": {"name": "linear"}})
    ...     ck = Checkpoint.open(d)  # a folder of checkpoints: the newest valid one
    ...     other = torch.nn.Linear(2, 3)
    ...     ck.load_weights(other)
    ...     bool(torch.equal(other.weight, net.weight)), ck.step, ck.path == path
    (True, 5, True)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clstm4d._common import atomic_dir, atomic_write_text
from clstm4d.errors import CheckpointError, CheckpointFormatError, ConfigError

from .config import SavedRun

__all__ = ["FORMAT_VERSION", "Checkpoint", "save_checkpoint", "verify_checkpoint"]

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "state.json"
CHECKSUMS_FILE = "checksums.json"
LATEST = "latest.json"
#: version of the checkpoint layout written here (``state.json["format"]``); absent = 1
FORMAT_VERSION = 1


def _jsonable(obj: Any) -> Any:
    """Tuples become ``{"__tuple__": [...]}`` so that they come back as tuples."""
    if isinstance(obj, tuple):
        return {"__tuple__": [_jsonable(v) for v in obj]}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, torch.Tensor):
        raise TypeError("tensors belong in safetensors, not JSON")
    return obj


def _from_json(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tuple__"}:
            return tuple(_from_json(v) for v in obj["__tuple__"])
        return {k: _from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    return obj


def _split_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = v
    return tensors, {"param_groups": _jsonable(sd["param_groups"]), "scalars": _jsonable(scalars)}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for idx, st in _from_json(meta["scalars"]).items():
        state.setdefault(int(idx), {}).update(st)
    return {"state": state, "param_groups": _from_json(meta["param_groups"])}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (global RNG saved)
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    meta = {"numpy": [name, int(pos), int(has_gauss), float(cached)],
            "python": _jsonable(random.getstate())}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    name, pos, has_gauss, cached = meta["numpy"]
    keys = tensors["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state((name, keys, pos, has_gauss, cached))  # noqa: NPY002
    random.setstate(_from_json(meta["python"]))


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    *,
    step: int,
    config: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    extra: dict[str, Any] | None = None,
    name: str | None = None,
    keep: int | None = None,
) -> Path:
    """Write a checkpoint ``directory/<name>`` atomically and point ``latest.json`` at it.

    Args:
        directory: the folder that holds checkpoints (created if needed).
        model: the model (unwrap DDP before passing it).
        step: the number of optimizer steps done.
        config: the resolved configuration (JSON serialisable).
        optimizer, scheduler, scaler: saved when given, for an exact ``--resume``; the RNG
            states of torch, numpy and Python are saved alongside them.
        extra: more JSON-serialisable state (e.g. last metrics).
        name: the checkpoint's folder name (default ``step_{step:06d}``).
        keep: keep only this many ``step_*`` checkpoints (older ones are deleted).

    Returns:
        The checkpoint's folder.
    """
    from safetensors.torch import save

    directory = Path(directory)
    final = directory / (name or f"step_{step:06d}")
    with atomic_dir(final) as tmp:
        sums: dict[str, str] = {}
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        sums[MODEL_FILE] = _write_bytes(tmp / MODEL_FILE, save(weights))
        state: dict[str, Any] = {"format": FORMAT_VERSION, "step": int(step),
                                 "extra": _jsonable(extra or {}), "checksums": CHECKSUMS_FILE}
        if optimizer is not None:
            tensors, meta = _split_optimizer(optimizer.state_dict())
            sums[OPTIM_FILE] = _write_bytes(tmp / OPTIM_FILE, save(tensors))
            state["optimizer"] = meta
            rng_tensors, rng_meta = _rng_state()
            sums[RNG_FILE] = _write_bytes(tmp / RNG_FILE, save(rng_tensors))
            state["rng"] = rng_meta
        if scheduler is not None:
            sd = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
            state["scheduler"] = _jsonable(sd)
        if scaler is not None and scaler.is_enabled():
            sd = scaler.state_dict()
            state["scaler"] = _jsonable({k: float(v) if isinstance(v, torch.Tensor) else v
                                         for k, v in sd.items()})
        for file, obj in ((CONFIG_FILE, _jsonable(config)), (STATE_FILE, state)):
            sums[file] = _write_bytes(tmp / file,
                                      json.dumps(obj, indent=2, sort_keys=True).encode())
        _write_bytes(tmp / CHECKSUMS_FILE, json.dumps({"sha256": sums}, indent=1).encode())
    atomic_write_text(directory / LATEST, json.dumps({"checkpoint": final.name,
                                                      "step": int(step)}))
    if keep is not None and keep > 0:
        olds = sorted(p for p in directory.glob("step_*") if p.is_dir() and p != final)
        for p in olds[: max(0, len(olds) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def _write_bytes(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` (a full disk raises ``OSError``, which a library writing the
    file itself may not); returns its sha256."""
    with open(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


#: the files that building the model reads (:meth:`Checkpoint.open` with ``weights_only``)
WEIGHT_FILES = (MODEL_FILE, CONFIG_FILE, STATE_FILE)


def _check_checksums(ck: Path, state: dict, files: tuple[str, ...] | None = None) -> None:
    """Compare the sha256 of ``files`` (default: all) with ``checksums.json`` (when the
    checkpoint has one)."""
    path = ck / CHECKSUMS_FILE
    if not path.is_file() and "checksums" not in state:
        return  # written before checksums were recorded
    sums = _read_json(path).get("sha256") if path.is_file() else None
    if not isinstance(sums, dict) or not sums:
        raise CheckpointError(f"damaged checkpoint file {path}: no sha256 checksums")
    for name, expected in sorted(sums.items()):
        if files is not None and name not in files:
            continue
        file = ck / os.path.basename(str(name))
        if not file.is_file():
            raise CheckpointError(f"checkpoint file missing: {file}")
        if _sha256(file) != expected:
            raise CheckpointError(f"damaged checkpoint file {file}: its sha256 differs from "
                                  "the one recorded when it was written")


def _locate(path: str | Path, checksums: bool | tuple[str, ...] = True) -> Path:
    """Resolve ``path`` to a checkpoint folder, checked with :func:`verify_checkpoint`:
    a checkpoint folder, its ``model.safetensors``, a folder of checkpoints with a
    ``latest.json`` pointer, or a training run folder whose ``checkpoints/`` has one (for the
    last two, a damaged newest checkpoint is skipped with a warning for the newest valid one).
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_file():
        if p.name == MODEL_FILE:
            p = p.parent
        else:
            raise CheckpointError(
                f"{p} is not a checkpoint: expected a folder with {MODEL_FILE} and {CONFIG_FILE}"
            )
    if (p / MODEL_FILE).is_file() or (p / STATE_FILE).is_file():
        return verify_checkpoint(p, checksums=checksums)
    for cand in (p, p / "checkpoints"):
        if (cand / LATEST).is_file() or any(cand.glob("step_*")):
            return _newest_valid(cand, checksums)
    raise CheckpointError(
        f"{p} is not a checkpoint: expected {MODEL_FILE} and {CONFIG_FILE}, or {LATEST}"
    )


def _step_of(folder: Path) -> int:
    try:
        return int(folder.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def _newest_valid(directory: Path, checksums: bool | tuple[str, ...] = True) -> Path:
    """The checkpoint ``latest.json`` names if it is valid, else the newest valid ``step_*``."""
    problems = []
    named = None
    try:
        named = directory / json.loads((directory / LATEST).read_text())["checkpoint"]
    except FileNotFoundError:
        problems.append(f"{LATEST} is missing")
    except (OSError, ValueError, KeyError, TypeError):
        problems.append(f"{LATEST} is unreadable")
    steps = sorted((d for d in directory.glob("step_*") if d.is_dir()), key=_step_of,
                   reverse=True)
    for ck in ([named] if named is not None else []) + [d for d in steps if d != named]:
        try:
            verify_checkpoint(ck, checksums=checksums)
        except CheckpointFormatError:
            raise
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:
            log.warning("%s; using %s, the newest valid checkpoint", "; ".join(problems), ck)
        return ck
    raise CheckpointError(f"no valid checkpoint in {directory}: "
                          + ("; ".join(problems) if problems else "it is empty"))


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"damaged checkpoint file {path}: {e}") from None


def verify_checkpoint(path: str | Path, *, checksums: bool | tuple[str, ...] = True) -> Path:
    """Check that the checkpoint folder ``path`` is complete and unchanged; returns it.

    Compares the sha256 of every file (or of the file names in ``checksums``) with
    ``checksums.json`` (``checksums=False`` skips that; checkpoints written before checksums
    were recorded have none), reads ``state.json``
    and ``config.json`` and the headers of the safetensors files (a header names every
    tensor's byte range, so a truncated file is detected).

    Raises:
        CheckpointError: a file is missing, cut short, changed or unreadable.
        CheckpointFormatError: ``state.json`` names a format newer than :data:`FORMAT_VERSION`.
    """
    ck = Path(path)
    state = _read_json(ck / STATE_FILE)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"damaged checkpoint file {ck / STATE_FILE}: no step")
    version = state.get("format", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        from clstm4d import __version__

        raise CheckpointFormatError(
            f"checkpoint {ck} has format version {version}; this clstm4d ({__version__}) "
            f"reads versions up to {FORMAT_VERSION}: upgrade clstm4d to use it"
        )
    _read_json(ck / CONFIG_FILE)
    for name in (MODEL_FILE, OPTIM_FILE, RNG_FILE) if "optimizer" in state else (MODEL_FILE,):
        _check_safetensors(ck / name)
    if checksums:
        _check_checksums(ck, state, None if checksums is True else tuple(checksums))
    return ck


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError included
        raise CheckpointError(f"damaged checkpoint file {path}: {e}") from None


def _regroup_single_group(saved: dict, model: torch.nn.Module,
                          optimizer: torch.optim.Optimizer) -> dict:
    """An optimizer state dict saved with one parameter group over all trainable parameters
    (in ``model.parameters()`` order), rearranged into ``optimizer``'s groups: each parameter
    keeps its moments; the hyperparameters come from the saved group except the new groups'
    own ``weight_decay``. Returned unchanged when the parameter counts differ (loading then
    fails with the optimizer's own message)."""
    (group,) = saved["param_groups"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    if len(group["params"]) != len(trainable):
        return saved
    old_index = {id(p): group["params"][i] for i, p in enumerate(trainable)}
    state, groups, k = {}, [], 0
    for g in optimizer.param_groups:
        new = {**group, "weight_decay": g["weight_decay"], "params": []}
        for p in g["params"]:
            if old_index.get(id(p)) in saved["state"]:
                state[k] = saved["state"][old_index[id(p)]]
            new["params"].append(k)
            k += 1
        groups.append(new)
    return {"state": state, "param_groups": groups}


class Checkpoint:
    """One checkpoint, opened once: resolved (a run folder gives its newest valid checkpoint),
    verified, its JSON read; everything else reads from it without looking for it again.

    Attributes:
        path: the checkpoint folder. state: ``state.json`` (``step``, ``extra``, ...).
        config: ``config.json`` as a plain dict. step: the optimizer steps done.
    """

    def __init__(self, path: Path, state: dict[str, Any], config: dict[str, Any]):
        self.path, self.state, self.config = Path(path), state, config

    @classmethod
    def open(cls, path: str | Path, *, weights_only: bool = False,
             checksums: bool = True) -> Checkpoint:
        """Open a checkpoint folder, its ``model.safetensors``, a folder of checkpoints with a
        ``latest.json`` pointer, or a training run folder, verified
        (:func:`verify_checkpoint`): with ``weights_only`` (to build the model, not to resume)
        only the checksums of :data:`WEIGHT_FILES` are compared; ``checksums=False`` skips
        the comparison (for benchmarks).

        Raises:
            CheckpointError: no (valid) checkpoint there; CheckpointFormatError: one of a
                newer format.
        """
        ck = _locate(path, WEIGHT_FILES if checksums and weights_only else checksums)
        return cls(ck, _from_json(_read_json(ck / STATE_FILE)),
                   _from_json(_read_json(ck / CONFIG_FILE)))

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, step={self.step})"

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def resumable(self) -> bool:
        """Whether it holds the optimizer state (else it holds weights only)."""
        return "optimizer" in self.state and (self.path / OPTIM_FILE).is_file()

    @cached_property
    def saved(self) -> SavedRun:
        """The typed configuration of the run (:class:`SavedRun`)."""
        try:
            return SavedRun.from_dict(self.config, source=f"checkpoint {self.path}")
        except ConfigError as e:
            raise CheckpointError(str(e)) from None

    def build_model(self, device: torch.device | str | None = None) -> torch.nn.Module:
        """The model the checkpoint was written for, with its weights, in eval mode."""
        model = self.saved.model_spec.build()
        self.load_weights(model)
        return (model if device is None else model.to(device)).eval()

    def load_weights(self, model: torch.nn.Module) -> None:
        """Load the weights into ``model``, strictly.

        Raises:
            CheckpointError: when keys or shapes differ, naming the first few differences, so
                a checkpoint from another model gives a clear message instead of a traceback.
        """
        weights = self._load(MODEL_FILE, "weights")
        own = model.state_dict()
        missing = sorted(set(own) - set(weights))
        unexpected = sorted(set(weights) - set(own))
        shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}"
                  for k in own if k in weights and weights[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:2])})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:2])})")
            if shapes:
                parts.append(f"{len(shapes)} with other shapes (e.g. {shapes[0]})")
            raise CheckpointError(
                f"checkpoint {self.path} was written for another model: weights "
                f"{'; '.join(parts)}")
        model.load_state_dict(weights, strict=True)

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: Any | None = None, scaler: Any | None = None) -> None:
        """Restore the model's weights and the optimizer, scheduler, scaler and RNG states,
        for an exact resume."""
        if not self.resumable:
            raise CheckpointError(f"checkpoint {self.path} holds weights only; it cannot be "
                                  "resumed")
        self.load_weights(model)
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        tensors = {k: v.to(dev) if not k.endswith(".step") else v
                   for k, v in self._load(OPTIM_FILE, "optimizer state").items()}
        saved = _join_optimizer(tensors, self.state["optimizer"])
        if len(saved["param_groups"]) == 1 and len(optimizer.param_groups) > 1:
            saved = _regroup_single_group(saved, model, optimizer)
            log.warning("checkpoint %s has one optimizer parameter group (written before the "
                        "per-group weight decay of param_groups); its state was regrouped",
                        self.path)
        try:
            optimizer.load_state_dict(saved)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"optimizer state in {self.path} does not fit: {e}") from None
        if scheduler is not None and "scheduler" in self.state:
            scheduler.load_state_dict({**scheduler.state_dict(), **self.state["scheduler"]})
        if scaler is not None and "scaler" in self.state:
            scaler.load_state_dict(self.state["scaler"])
        if (self.path / RNG_FILE).is_file():
            _set_rng_state(self._load(RNG_FILE, "RNG state"), self.state["rng"])

    def _load(self, name: str, what: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        try:
            return load_file(str(self.path / name))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"unreadable {what} {self.path / name}: {e}") from None
