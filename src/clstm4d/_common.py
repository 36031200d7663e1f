"""Small helpers every layer uses, one home each (torch-free: numpy and the standard library).

- argument checks that name the owner, the argument, what is allowed and what arrived:
  :func:`check_spatial_dims`, :func:`check_int`, :func:`per_axis`, :func:`check_choice`;
- writes that never leave a half-written file or folder under its final name:
  :func:`atomic_file`, :func:`atomic_write_text`, :func:`atomic_dir` (temporary sibling,
  ``fsync``, rename);
- NaN-safe summaries: :func:`nanmean`, :func:`json_finite`; sizes for people:
  :func:`human_bytes`;
- the one tolerance by which two voxel grids count as the same: :func:`same_affine`;
- the memory the machine can still give, and one check of a size against it:
  :func:`available_host_memory`, :func:`check_host_memory`.

Examples:
    >>> per_axis("roi", 32, 3, "plan")
    (32, 32, 32)
    >>> per_axis("roi", [32, 16], 2, "plan")
    (32, 16)
    >>> nanmean([1.0, float("nan"), 3.0]), json_finite({"a": float("inf")})
    (2.0, {'a': None})
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GRID_ATOL", "GRID_RTOL", "atomic_dir", "atomic_file", "atomic_write_text",
           "available_host_memory", "check_choice", "check_host_memory", "check_int",
           "check_spatial_dims", "human_bytes", "json_finite", "nanmean", "per_axis",
           "remove_stale_temporaries", "same_affine"]

#: Two grids are the same when their ``(4, 4)`` affines agree within these tolerances
#: (``numpy.allclose``): 1e-3 (mm) absolute covers the float32 rounding of spacings, origins
#: and directions that NIfTI/NRRD writers of other tools store (qform vs sform), and no real
#: difference of grids is that small.
GRID_ATOL = 1e-3
GRID_RTOL = 1e-4


# ------------------------------------------------------------------------------ argument checks

def _prefix(owner: str | None) -> str:
    return f"{owner}: " if owner else ""


def check_int(name: str, value: Any, minimum: int = 1, owner: str | None = None) -> int:
    """``value`` as an int, checked to be an integer (``TypeError`` otherwise; ``bool`` is not
    one) of at least ``minimum`` (``ValueError``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{_prefix(owner)}{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{_prefix(owner)}{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_spatial_dims(value: Any, owner: str | None = None, *, allow_none: bool = False
                       ) -> int | None:
    """``value`` checked to be 1, 2 or 3 (or ``None`` when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or value not in (1, 2, 3):
        raise ValueError(f"{_prefix(owner)}spatial_dims must be 1, 2 or 3, got {value!r}")
    return int(value)


def check_choice(name: str, value: Any, allowed: Sequence[Any], owner: str | None = None) -> Any:
    """``value`` checked to be one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{_prefix(owner)}{name} must be one of {list(allowed)}, got {value!r}")
    return value


def per_axis(name: str, value: Any, spatial_dims: int, owner: str | None = None, *,
             minimum: int = 1, error: type[Exception] | None = None) -> tuple[int, ...]:
    """One int for every axis, or one int per axis, as a tuple of ``spatial_dims`` ints each at
    least ``minimum``. A one-element sequence counts for every axis.

    Raises:
        ValueError: a sequence of another length; TypeError / ValueError (from
            :func:`check_int`): an entry that is not an int >= ``minimum``; ``error`` instead
            of both when given (e.g. a ``ConfigError`` for a user's option).
    """
    if error is not None:
        try:
            return per_axis(name, value, spatial_dims, owner, minimum=minimum)
        except (TypeError, ValueError) as e:
            raise error(str(e)) from None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        values: Sequence[Any] = (value,) * spatial_dims
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        values = tuple(value) * spatial_dims if len(value) == 1 else tuple(value)
    else:
        values = ()
    if len(values) != spatial_dims:
        raise ValueError(f"{_prefix(owner)}{name} must be an int or a sequence of "
                         f"{spatial_dims} ints (one per spatial axis), got {value!r}")
    return tuple(check_int(name, v, minimum, owner) for v in values)


# ------------------------------------------------------------------------------ atomic writes

def _umask_mode(path: str | os.PathLike, mode: int) -> None:
    """Give a mkstemp/mkdtemp result (0600/0700) the permissions a plain open/mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (True when that cannot be told)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _naming(error: OSError, tmp: Path | None, final: Path) -> OSError:
    """``error`` as raised while writing ``final`` through the temporary ``tmp``: the same
    type and errno, naming the file under ``final`` (what the user asked for), not the
    temporary one."""
    if error.errno is None:
        return error
    name = final
    if error.filename is not None and tmp is not None:
        try:
            name = final / Path(os.fsdecode(error.filename)).relative_to(tmp)
        except ValueError:  # not under tmp: tmp itself, or another file
            name = final if Path(os.fsdecode(error.filename)) == tmp else error.filename
    try:
        return type(error)(error.errno, error.strerror or str(error), os.fspath(name))
    except TypeError:  # an OSError subclass with another constructor
        return error


#: the names :func:`atomic_file` and :func:`atomic_dir` give their temporaries of ``name``:
#: ``.tmp-<pid>-<random>-<name>`` and ``.<name>.<pid>.<random>.tmp|old`` (mkstemp's random
#: part has neither ``-`` nor ``.``)
_TEMPORARY = re.compile(r"^(?:\.tmp-(?P<f>\d+)-[^-.]+-(?P<fname>.+)"
                        r"|\.(?P<dname>.+)\.(?P<d>\d+)\.[^-.]+\.(?P<kind>tmp|old))$")


def remove_stale_temporaries(final: str | os.PathLike, *, every: bool = False) -> list[Path]:
    """Remove the temporaries that an atomic write of ``final`` left behind when its process
    was killed (the process named in the temporary's name is gone); returns them.

    A folder that :func:`atomic_dir` had moved aside (``.old``) while ``final`` is missing is
    put back under ``final`` first: the kill came between its two renames. ``every``: ``final``
    is a folder, and the stale temporaries of every name in it are removed.
    """
    final = Path(final)
    folder = final if every else final.parent
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in sorted(names, key=lambda n: n.endswith(".old")):  # .tmp first, then .old
        m = _TEMPORARY.match(name)
        target = m and (m.group("fname") or m.group("dname"))
        if not target or (not every and target != final.name) or _pid_alive(
                int(m.group("f") or m.group("d"))):
            continue
        stale, target = folder / name, folder / target
        if m.group("kind") == "old" and (stale / target.name).exists() and not target.exists():
            os.replace(stale / target.name, target)
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; when the block ends without an error, flush it
    to disk (``fsync``) and rename it onto ``final``.

    The temporary name ends with ``final``'s name, so libraries that pick the format from the
    extension (``.nii.gz``) see the right one, and holds the writer's process id, so that the
    temporaries of a killed run are removed by the next write of ``final``
    (:func:`remove_stale_temporaries`). A crash or an error leaves no half-written file under
    the final name (``os.replace`` is atomic on one file system), and the temporary file is
    removed. An ``OSError`` (a full disk, a read-only folder) names ``final``.

    Examples:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path((tmpdir := tempfile.TemporaryDirectory()).name)
        >>> with atomic_file(d / "a.txt") as tmp:
        ...     _ = tmp.write_text("hello")
        >>> (d / "a.txt").read_text(), sorted(p.name for p in d.iterdir())
        ('hello', ['a.txt'])
        >>> tmpdir.cleanup()
    """
    final = Path(final)
    tmp = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(final)
        fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".tmp-{os.getpid()}-",
                                    suffix="-" + final.name)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        _fsync(tmp)
        _umask_mode(tmp, 0o666)
        os.replace(tmp, final)
    except OSError as e:
        raise _naming(e, tmp, final) from e
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def _move_into(tmp: Path, final: Path, replace: bool) -> None:
    """Put the finished folder ``tmp`` in place of (``replace``) or into ``final``."""
    if not final.exists():
        os.replace(tmp, final)
    elif replace:
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".old",
                                    dir=final.parent))
        os.replace(final, old / final.name)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:  # final holds other files to keep: each file goes in whole, one at a time
        for f in sorted(tmp.rglob("*")):
            target = final / f.relative_to(tmp)
            if f.is_dir():
                target.mkdir(exist_ok=True)
            else:
                os.replace(f, target)
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield a new temporary folder beside ``final``; when the block ends without an error,
    flush its files to disk and rename it onto ``final``, so that a killed run leaves either
    the whole set of files under ``final`` or none of them.

    Args:
        final: the folder.
        replace: an existing ``final`` is moved aside first and removed after, so at no
            moment is there no folder ``final``, nor a half-written one. ``False``: an existing
            ``final`` holds files to keep (e.g. the user's, with ``--overwrite``): the new
            files are moved into it one by one, each complete (the set is then not atomic).

    On an error the temporary folder is removed; temporaries of a killed earlier run are
    removed on entry (:func:`remove_stale_temporaries`). An ``OSError`` names ``final``.

    Examples:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path((tmpdir := tempfile.TemporaryDirectory()).name)
        >>> with atomic_dir(d / "set") as tmp:
        ...     _ = (tmp / "a.txt").write_text("a"), (tmp / "b.txt").write_text("b")
        >>> sorted(p.name for p in d.iterdir()), sorted(p.name for p in (d / "set").iterdir())
        (['set'], ['a.txt', 'b.txt'])
        >>> tmpdir.cleanup()
    """
    final = Path(final)
    tmp = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp",
                                    dir=final.parent))
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        _umask_mode(tmp, 0o777)
        _move_into(tmp, final, replace)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise _naming(e, tmp, final) from e
        raise


# ------------------------------------------------------------------------------ summaries

def nanmean(values: Iterable[Any]) -> float:
    """Mean of the finite values (None, NaN and inf left out); NaN when there are none."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def json_finite(obj: Any) -> Any:
    """``obj`` with every NaN/inf float replaced by None (strict JSON); tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_finite(v) for v in obj]
    return obj


def human_bytes(n: float, *, round_up: bool = False, sep: str = " ") -> str:
    """``n`` bytes in the largest binary unit that keeps the number >= 1, to three significant
    digits (``round_up``: rounded up, e.g. for a budget that must be at least ``n``; with
    ``sep=""`` the text is what ``--memory`` reads).

    Examples:
        >>> human_bytes(1.5 * 2**30), human_bytes(5_300_000), human_bytes(512)
        ('1.5 GiB', '5.05 MiB', '512 B')
        >>> human_bytes(5_300_000, round_up=True, sep="")
        '5.06MiB'
    """
    n = float(n)
    unit, scale = next(((u, s) for u, s in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20),
                                            ("KiB", 2**10)) if abs(n) >= s), ("B", 1))
    value = n / scale
    if round_up and value:
        digits = 2 - math.floor(math.log10(abs(value)))
        value = math.ceil(value * 10**digits) / 10**digits
    return f"{value:.3g}{sep}{unit}"


def same_affine(a: Any, b: Any) -> bool:
    """Whether two ``(4, 4)`` voxel-to-world affines describe the same grid (within
    :data:`GRID_ATOL` / :data:`GRID_RTOL`)."""
    return bool(np.allclose(np.asarray(a, float), np.asarray(b, float), atol=GRID_ATOL,
                            rtol=GRID_RTOL))


# ------------------------------------------------------------------------------ memory

def available_host_memory() -> int:
    """Bytes of memory the operating system can still give (``MemAvailable`` on Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): cannot tell
        return 2**62


def check_host_memory(nbytes: float, what: str, error: type[Exception] = MemoryError) -> None:
    """Raise ``error`` (one line: ``what`` needs about ``nbytes``, the machine has ...) when
    ``nbytes`` exceed :func:`available_host_memory`: a guard before an allocation that would
    otherwise make the kernel kill the process, or the machine."""
    budget = available_host_memory()
    if nbytes > budget:
        raise error(f"{what} needs about {human_bytes(nbytes)} of memory, and this machine has "
                    f"{human_bytes(budget)} available")
