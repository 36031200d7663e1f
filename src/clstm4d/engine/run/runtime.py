"""Devices, mixed precision, distributed set-up and peak-memory measurement.

Everything here is chosen once at the start of a run and passed down; models never hold a
device.

Examples:
    >>> resolve_device("cpu")
    device(type='cpu')
    >>> with PeakMemory(torch.device("cpu")) as pm:
    ...     x = torch.ones(1_000_000)
    >>> pm.peak_bytes >= 0
    True
"""

from __future__ import annotations

import contextlib
import datetime
import os
import resource
import sys
import threading
from dataclasses import dataclass
from typing import Any

import torch

from clstm4d import _common
from clstm4d.errors import UserError

__all__ = ["DistInfo", "PeakMemory", "ReserveMeter", "amp_dtype", "autocast", "available_memory",
           "init_distributed", "precision_of", "process_memory",
           "release_cached_memory", "reset_process_peak", "resolve_device",
           "return_freed_memory"]

#: glibc's ``M_MMAP_THRESHOLD`` (mallopt) and the size from which ``train`` maps allocations.
_M_MMAP_THRESHOLD, MMAP_THRESHOLD = -3, 64 * 2**10


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> the CUDA device ``local_rank`` when CUDA is available, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}' (expected auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but CUDA is not available")
    return dev


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype for ``amp`` in ``{"auto", "bf16", "fp16", "none"}`` (None = off).

    ``"auto"`` picks bf16 on CUDA devices that support it and fp32 elsewhere (bf16 on CPUs
    without native support is slower than fp32).
    """
    if amp not in ("auto", "bf16", "fp16", "none"):
        raise UserError(f"amp must be one of auto, bf16, fp16, none; got '{amp}'")
    if amp == "none":
        return None
    if amp == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if amp == "fp16":
        if device.type != "cuda":
            raise UserError("amp=fp16 needs a CUDA device; use amp=bf16 or amp=none on CPU")
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for ``dtype`` on ``device``, or a no-op when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class DistInfo:
    """Where this process sits in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str = "auto", timeout_s: float | None = None
                     ) -> tuple[DistInfo, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; uses nccl when the device is CUDA and
    gloo otherwise. Without those variables (a plain ``python`` run) nothing is initialised.
    ``timeout_s`` bounds how long a collective waits for a rank that is gone or hangs before
    it raises (default: PyTorch's).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local)
    if world <= 1:
        return DistInfo(), device
    import torch.distributed as dist

    here = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", **kw)
        here = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, here), device


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def _release_free_memory() -> None:
    """Return freed heap memory to the OS (glibc), so that a new measurement starts from what
    is really in use rather than from what an earlier run left cached in the allocator."""
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def return_freed_memory() -> bool:
    """Serve every allocation of :data:`MMAP_THRESHOLD` bytes or more with its own memory
    mapping (glibc; elsewhere nothing happens), so that a freed tensor leaves the resident set
    at once instead of staying in the heap for later reuse: the peak resident memory of the
    process is then the peak of what is alive, which the memory model predicts. glibc
    otherwise raises the threshold to the largest block freed so far (up to 32 MiB), and the
    heap keeps what a training step and a validation pass freed. Returns whether it was set.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def release_cached_memory(device: Any) -> None:
    """On CUDA, hand the caching allocator's unused blocks back to the device (a no-op on
    CPU, where ``train`` maps large tensors afresh). ``train`` calls it before and after
    validation, so that blocks cut for the training step's shapes and for validation's
    never pile up: the reserve then peaks at the larger of the two phases, as the process
    model counts it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _cuda_context(device: Any) -> int:
    """Bytes the CUDA device has in use beyond PyTorch's reserve (the context: driver,
    loaded kernels, libraries' workspaces); assumes no other process shares the device."""
    free, total = torch.cuda.mem_get_info(device)
    return max(0, int(total - free - torch.cuda.memory_reserved(device)))


class ReserveMeter:
    """The CUDA caching allocator's peak reserve phase by phase (what ``clstm4d plan``
    measures): :meth:`start` releases the cache and starts the peak again, :meth:`peak`
    releases the phase's cache and returns its peak reserve (bytes), :meth:`context` the
    device's memory beyond the reserve."""

    def __init__(self, device: Any):
        self.device = torch.device(device)

    def start(self) -> None:
        release_cached_memory(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        release_cached_memory(self.device)
        return int(torch.cuda.max_memory_reserved(self.device))

    def context(self) -> int:
        return _cuda_context(self.device)


def process_memory(device: Any, peak: bool = True) -> int:
    """The process's memory as the process model counts it (bytes): on CPU its peak resident
    set (``VmHWM``; ``ru_maxrss`` where /proc is missing), or the resident set now with
    ``peak=False``; on CUDA ``torch.cuda.max_memory_reserved`` (or ``memory_reserved``) plus
    the context (what the device has in use beyond PyTorch's allocator: assumes the device is
    not shared with another process)."""
    device = torch.device(device)
    if device.type == "cuda":
        top = torch.cuda.max_memory_reserved(device) if peak else \
            torch.cuda.memory_reserved(device)
        return int(top + _cuda_context(device))
    value = _status_bytes("VmHWM" if peak else "VmRSS")
    if value is None:
        scale = 1 if sys.platform == "darwin" else 1024
        value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return int(value)


def reset_process_peak(device: Any) -> None:
    """Start :func:`process_memory`'s peak again from now (CPU: Linux's ``clear_refs``; a
    no-op where that is not allowed; CUDA: the allocator's peak statistics)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class PeakMemory:
    """Peak memory used inside a ``with`` block, in bytes (``peak_bytes``).

    On CUDA: the peak of ``torch.cuda.max_memory_allocated`` above the level at entry. On CPU:
    the peak resident set size above the level at entry (after handing freed heap memory back
    to the OS), sampled every ``interval`` seconds from ``/proc/self/statm`` (Linux); elsewhere
    the process's lifetime ``ru_maxrss``.
    """

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device = device
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        _release_free_memory()
        self._base = _rss_bytes()
        self._peak = self._base or 0
        if self._base is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def so_far(self) -> int:
        """The peak above the level at entry until now (bytes), inside the ``with`` block."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device) - self._base)
        if self._base is None:
            return 0
        return int(max(self._peak, _rss_bytes() or 0) - self._base)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_bytes() or 0)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        if self._base is None:
            scale = 1 if sys.platform == "darwin" else 1024
            self.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes() or 0)
        self.peak_bytes = self._peak - self._base


def available_memory(device: Any) -> int:
    """Bytes the training device can still give: free CUDA memory, or the operating system's
    available memory (``MemAvailable``) for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return _common.available_host_memory()


def precision_of(amp_dtype: Any) -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"`` for an autocast dtype (``None`` = off)."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
