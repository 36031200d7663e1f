"""Output folders and run folders: no command replaces an input, or a file it did not write,
by accident; a training run's folder has one layout and one resume policy.

Two rules, used by every command that writes:

- :func:`check_outputs` (``predict``): an output that *is* one of the inputs is always
  refused, however it is spelled (relative path, symlink, hard link); an output that already
  exists is refused unless ``overwrite`` is given.
- :class:`OutputFolder` (``demo``, ``synth``, ``evaluate``, ``train`` ``--out``): a folder may
  be written into when it is new or empty, or when it holds only what the same command wrote
  there before (recorded in a small manifest, :data:`MANIFEST`); anything else in it is
  refused unless ``overwrite`` is given. So ``make demo`` can run twice, but
  ``evaluate --out labels/`` cannot scatter its files among the user's label maps.

Paths are compared after :func:`os.path.realpath`, so ``./a/../scan.nii.gz`` and a symlink to
the scan are the scan.

Examples:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path((tmpdir := tempfile.TemporaryDirectory()).name)
    >>> _ = (d / "scan.nii.gz").write_bytes(b"x")
    >>> try:
    ...     check_outputs([d / "sub" / ".." / "scan.nii.gz"], inputs=[d / "scan.nii.gz"])
    ... except UserError as e:
    ...     print(str(e).split(" is ")[1][:22])
    one of the input files
    >>> with OutputFolder(d / "out", "synth") as out:
    ...     _ = (out.path / "datalist.json").write_text("{}")
    >>> sorted(p.name for p in (d / "out").iterdir())
    ['.clstm4d-output.json', 'datalist.json']
    >>> with OutputFolder(d / "out", "synth"):  # its own earlier output: may be reused
    ...     pass
    >>> tmpdir.cleanup()
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from clstm4d._common import atomic_write_text, remove_stale_temporaries
from clstm4d.errors import UserError

from .checkpoint import Checkpoint

__all__ = ["LOCK", "MANIFEST", "OutputFolder", "RunFolder", "RunLock", "check_label_outputs",
           "check_outputs", "same_file"]

log = logging.getLogger(__name__)

MANIFEST = ".clstm4d-output.json"
_MANIFEST_VERSION = 1


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.fspath(path)))


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name the same file: same real path, or (both existing) the
    same inode (hard links)."""
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(outputs: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike] = (),
                  *, overwrite: bool = False, folder: str | os.PathLike | None = None,
                  option: str = "--output") -> None:
    """Refuse to write ``outputs`` over an input, or over existing files without ``overwrite``.

    Args:
        outputs: every file the command is about to write.
        inputs: every file it read (for a per-frame series, each frame file).
        overwrite: allow replacing existing files that are not inputs (and writing into a
            non-empty ``folder``).
        folder: the output folder of a per-frame series, refused when it is not empty.
        option: the command-line option named in the messages.

    Raises:
        UserError: naming the output, the input it would replace, and what to do.
    """
    outputs = [Path(p) for p in outputs]
    inputs = [Path(p) for p in inputs]
    for out in outputs:
        for src in inputs:
            if same_file(out, src):
                where = "" if _real(out) == _real(src) else f" ({out} is a link to it)"
                raise UserError(
                    f"{option} {out} is one of the input files ({src}){where}; writing the "
                    f"result there would destroy the input, so choose another {option}"
                )
    if overwrite:
        return
    if folder is not None and Path(folder).is_dir() and any(Path(folder).iterdir()):
        raise UserError(f"{option} folder {folder} is not empty; choose a new or empty folder, "
                        "or pass --overwrite to replace the files in it")
    for out in outputs:
        if out.exists() or out.is_symlink():
            raise UserError(f"{option} {out} already exists; choose another {option} "
                            "or pass --overwrite to replace it")


def check_label_outputs(geometry, output: str | os.PathLike,
                        inputs: Iterable[str | os.PathLike] = (), *, overwrite: bool = False,
                        option: str = "--output"):
    """:func:`check_outputs` for the label map of an image with ``geometry`` written to
    ``output`` (a file, or the folder of a per-frame series; the extension chooses the
    format): the files :func:`~clstm4d.data.write_result` would write are checked against
    the image's source files and ``inputs`` (what the user named: files or a folder).

    Returns:
        The :class:`~clstm4d.data.output.ResolvedOutput` to pass to ``write_result``.
    """
    from clstm4d.data import resolve_output

    resolved = resolve_output(geometry, output, option=option)
    inputs = [*geometry.sources, *(p for p in inputs if Path(p).is_file())]
    folder = resolved.path if resolved.series and resolved.files[0].parent == resolved.path \
        else None
    check_outputs(resolved.files, inputs, overwrite=overwrite, folder=folder, option=option)
    return resolved


class OutputFolder:
    """A folder a command writes into, with a manifest of what that command wrote there.

    Use as a context manager: entering checks the folder (and creates it); leaving, also after
    an error or Ctrl-C, records the folder's entries as this command's output, so the next run
    of the same command may reuse the folder (a folder it created and left empty is removed).
    :meth:`check` alone checks without writing anything, to fail before a long computation.

    Args:
        path: the folder (``--out``).
        command: the command that writes it (``"demo"``, ``"synth"``, ...).
        overwrite: write into the folder even when it holds files this command did not write
            (those files stay unrecorded, so the next run needs ``overwrite`` again).
        option: the command-line option named in the messages.

    Attributes:
        path: the folder as given. own: entries (top-level names) recorded as this command's
            before it started. foreign: the other entries found (only when ``overwrite``).

    Raises:
        UserError: on entering, when ``path`` is a file, or holds entries of another command
            or of no command and ``overwrite`` is false.
    """

    def __init__(self, path: str | os.PathLike, command: str, *, overwrite: bool = False,
                 option: str = "--out"):
        self.path = Path(path)
        self.command = command
        self.overwrite = overwrite
        self.option = option
        self.own: set[str] = set()
        self.foreign: set[str] = set()
        self._created = False
        self._created_parents: list[Path] = []

    def _entries(self) -> set[str]:
        return {name for name in os.listdir(self.path) if name != MANIFEST}

    def _manifest(self) -> dict | None:
        try:
            data = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
            return None
        return data

    def check(self) -> OutputFolder:
        """Check the folder (see the class) without writing anything; returns ``self``."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.option} {self.path} is a file, not a folder")
        if not self.path.is_dir():
            return self
        entries = self._entries()
        manifest = self._manifest()
        if manifest is not None and manifest.get("command") != self.command and entries:
            other = manifest.get("command")
            if not self.overwrite:
                raise UserError(
                    f"{self.option} {self.path} holds the output of 'clstm4d {other}', not of "
                    f"'clstm4d {self.command}'; choose a new or empty folder, or pass "
                    "--overwrite to write into it anyway"
                )
            manifest = None
        self.own = entries & set(manifest["entries"]) if manifest is not None else set()
        self.foreign = entries - self.own
        if self.foreign and not self.overwrite:
            shown = ", ".join(sorted(self.foreign)[:3]) + (", ..." if len(self.foreign) > 3
                                                          else "")
            raise UserError(
                f"{self.option} {self.path} already holds files that 'clstm4d {self.command}' "
                f"did not write ({shown}); choose a new or empty folder, or pass --overwrite "
                "to write into it anyway"
            )
        if self.foreign:
            log.warning("writing into %s, which holds %d entries clstm4d did not write "
                        "(--overwrite)", self.path, len(self.foreign))
        return self

    def record(self, planned: Iterable[str] = (), at: str | os.PathLike | None = None) -> None:
        """Write the manifest: every entry of the folder except the foreign ones, plus the
        ``planned`` names the command is about to write. A folder this object created that is
        still empty is removed instead. ``at``: write the manifest of the entries of that
        folder into it instead (a temporary folder that will be renamed onto :attr:`path`)."""
        if at is not None:
            names = {n for n in os.listdir(at) if n != MANIFEST} | set(planned)
            atomic_write_text(Path(at) / MANIFEST, json.dumps(
                {"format": _MANIFEST_VERSION, "command": self.command,
                 "entries": sorted(names - self.foreign)}, indent=1))
            return
        if not self.path.is_dir():
            return
        own = sorted((self._entries() | set(planned)) - self.foreign)
        if not own and self._created:
            self.path.rmdir()
            for parent in self._created_parents:  # and the parents it made for it
                try:
                    parent.rmdir()
                except OSError:  # not empty: something else is there now
                    break
            return
        atomic_write_text(self.path / MANIFEST, json.dumps(
            {"format": _MANIFEST_VERSION, "command": self.command, "entries": own}, indent=1))

    def __enter__(self) -> OutputFolder:
        self.check()
        self._created = not self.path.exists()
        self._created_parents = [p for p in self.path.absolute().parents if not p.exists()]
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc) -> None:
        self.record()


# ------------------------------------------------------------------------------ run folders

LOCK = ".clstm4d.lock"


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux ``/proc``, clock ticks since boot), to tell a
    live process from a new one that reuses a dead one's PID; None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    """Whether the process that wrote lock contents ``holder`` still runs (True when that
    cannot be told, e.g. on another host)."""
    import socket

    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    started = holder.get("started")
    return started is None or _process_start(pid) in (None, started)


class RunLock:
    """A lock file with the owner's PID in a run folder: one training process writes it.

    A lock left by a process that is gone (killed, crashed; on this host) is taken over with a
    warning; a lock held by a live process, or written on another host, is refused with a
    message naming that process.

    Examples:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path((tmpdir := tempfile.TemporaryDirectory()).name)
        >>> with RunLock(d):
        ...     (d / LOCK).is_file()
        True
        >>> (d / LOCK).exists()
        False
        >>> tmpdir.cleanup()
    """

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK
        self.held = False

    def _holder(self) -> dict | None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def acquire(self) -> RunLock:
        import socket
        import time

        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": _process_start(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(50):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder == {}:  # removed meanwhile
                    continue
                if holder is None:  # being written right now, or left empty by a crash
                    if time.time() - self._mtime() < 5:
                        time.sleep(0.1)
                        continue
                elif holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                    pass  # an earlier run of this same process that ended with an error
                elif _alive(holder):
                    raise self._in_use(holder) from None
                else:
                    log.warning("taking over the lock of %s from process %s, which is gone",
                                self.path.parent, holder.get("pid"))
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise UserError(f"could not lock run folder {self.path.parent} ({self.path} keeps "
                        "changing); is another process starting there?")

    def _in_use(self, holder: dict) -> UserError:
        return UserError(
            f"run folder {self.path.parent} is in use by process {holder.get('pid')} on "
            f"{holder.get('host')} (since {holder.get('since')}); wait for it or stop it, or "
            f"choose another --out (if that process is gone, delete {self.path})"
        )

    def check(self) -> None:
        """Raise the error :meth:`acquire` would for a lock held by another live process
        (nothing is written)."""
        import socket

        holder = self._holder()
        if holder and not (holder.get("pid") == os.getpid()
                           and holder.get("host") == socket.gethostname()) and _alive(holder):
            raise self._in_use(holder)

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self if self.held else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class RunFolder:
    """The folder of a training run (``train --out``): its layout, checked, locked and recorded,
    and the one place that decides what a run resumes from.

    Layout: ``checkpoints/`` (:attr:`checkpoints`; ``latest.json`` points at the newest),
    ``metrics.jsonl`` and ``metrics.csv`` (one row per logged step), ``tensorboard/`` (when
    TensorBoard is installed), the lock file and the manifest of :class:`OutputFolder`.

    Resume policy (on top of :class:`OutputFolder`'s rules): a folder that already holds a run
    (a non-empty ``checkpoints/``) is continued only with ``resume``, or started again from step
    0 with ``overwrite`` (its old checkpoints are then deleted, so that none of them can be
    taken for a checkpoint of the new run). A bare ``resume`` of a folder without checkpoints
    starts at step 0, so a requeued job can always pass ``--resume``.

    Args:
        path: the run folder.
        resume: a checkpoint or run folder to continue from, or None.
        overwrite: see above.
    """

    CHECKPOINTS = "checkpoints"
    METRICS_JSONL = "metrics.jsonl"
    METRICS_CSV = "metrics.csv"
    TENSORBOARD = "tensorboard"
    ENTRIES = (CHECKPOINTS, METRICS_JSONL, METRICS_CSV, TENSORBOARD, LOCK)

    def __init__(self, path: str | os.PathLike, *, resume: str | os.PathLike | None = None,
                 overwrite: bool = False):
        self.path = Path(path)
        self.resume = None if resume is None else Path(resume)
        self.overwrite = overwrite
        self.folder = OutputFolder(self.path, "train", overwrite=overwrite,
                                   option="--out (train.out)")
        self.lock = RunLock(self.path)
        self._checked = False
        self._resume_from: Checkpoint | None = None

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def metrics_jsonl(self) -> Path:
        return self.path / self.METRICS_JSONL

    @property
    def metrics_csv(self) -> Path:
        return self.path / self.METRICS_CSV

    @property
    def tensorboard(self) -> Path:
        return self.path / self.TENSORBOARD

    def _checkpoint_entries(self) -> list[str]:
        return sorted(os.listdir(self.checkpoints)) if self.checkpoints.is_dir() else []

    def _resumes_itself(self) -> bool:
        return self.resume is not None and any(
            same_file(self.resume, p) for p in (self.path, self.checkpoints))

    def check(self) -> Checkpoint | None:
        """Check the folder (nothing is written) and open what to resume from: the
        :class:`~clstm4d.engine.run.checkpoint.Checkpoint`, or None to start at step 0.
        Checked once; later calls return the same answer."""
        if self._checked:
            return self._resume_from
        self.folder.check()
        self.lock.check()
        if self._resumes_itself() and not self._checkpoint_entries():
            log.info("no checkpoint in %s yet: starting at step 0", self.path)
            self.resume = None
        elif self.resume is None and self._checkpoint_entries() and not self.overwrite:
            raise UserError(
                f"--out (train.out) {self.path} already holds a training run; pass --resume "
                "to continue it, --overwrite to start it again from step 0, or choose "
                "another --out"
            )
        self._resume_from = None if self.resume is None else Checkpoint.open(self.resume)
        self._checked = True
        return self._resume_from

    def open(self) -> None:
        """Create and lock the folder, remove the temporaries a killed run left in it, record
        it as a training run's, and (starting again with ``overwrite``) delete its old
        checkpoints."""
        import shutil

        self.path.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            for folder in (self.path, self.checkpoints):  # what a killed run left half-written
                remove_stale_temporaries(folder, every=True)
            if self.resume is None and self.CHECKPOINTS in self.folder.own and self.overwrite:
                shutil.rmtree(self.checkpoints)
            self.folder.record(planned=self.ENTRIES)
        except BaseException:
            self.lock.release()
            raise

    def close(self) -> None:
        self.lock.release()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
