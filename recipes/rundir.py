"""Run directories that survive ``kill -9``, a full disk, a second process and a planted file.

docs/design.md, section 10. Each function does one job:

- **atomic files** (:func:`write_bytes_atomic`, :func:`write_text_atomic`,
  :func:`write_json_atomic`, :func:`save_file_atomic`, :func:`atomic_output`): written to a
  temporary name in the same folder, flushed to disk (``fsync``) and renamed over the target
  (``os.replace``), so a kill at any moment leaves either the old file or the new one, never a
  truncated one;
- **metrics** (:func:`append_metrics`, :func:`read_metrics`, :func:`truncate_metrics`): one JSON
  record per line; a half-written last line (a kill during an append) is dropped with a
  :class:`RunDirectoryWarning`;
- **the lock** (:class:`RunLock`): an advisory ``flock`` on ``<run>/.lock`` that names its
  holder's PID; the kernel releases it when the holder exits or is killed;
- **overwrite guard** (:func:`is_run_directory`, :func:`check_overwrite`,
  :func:`clear_run_directory`): ``--overwrite`` empties run directories only, never through a
  symbolic link;
- **checkpoint manifest** (:func:`write_manifest`, :func:`verify_checkpoint`,
  :func:`newest_intact_checkpoint`): sizes and SHA-256 of every file, written last, so a
  checkpoint is used only when complete and unchanged;
- **safe loading** (:func:`load_torch_file`, :func:`load_checkpoint_files`,
  :func:`load_state_safely`, :func:`save_train_state_json`): nothing a resume reads is unpickled
  with arbitrary classes;
- **resume policy** (:func:`resume_decision`, :func:`check_resume_overrides`,
  :func:`apply_optimizer_settings`);
- **storage errors** (:func:`storage_errors`): a full disk or a read-only folder becomes one
  clear :class:`~gali_ext.errors.CheckpointError` or :class:`~gali_ext.errors.ConfigError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gali_ext.errors import CheckpointError, ConfigError, GaliError

__all__ = [
    "CHECKPOINTS_NAME",
    "CONFIG_NAME",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "METRICS_NAME",
    "RESUME_APPLIED",
    "RUN_FILES",
    "RUN_FOLDERS",
    "TRAIN_STATE_NAME",
    "ResumeDecision",
    "RunDirectoryWarning",
    "RunLock",
    "adopt_checkpoint",
    "append_metrics",
    "apply_optimizer_settings",
    "atomic_output",
    "check_overwrite",
    "check_resume_overrides",
    "checkpoint_number",
    "check_no_links",
    "check_out_path",
    "clear_run_directory",
    "foreign_checkpoint_entries",
    "is_run_directory",
    "list_checkpoints",
    "load_checkpoint_files",
    "load_state_safely",
    "load_torch_file",
    "load_train_state_json",
    "newest_intact_checkpoint",
    "read_metrics",
    "remove_temporaries",
    "resume_decision",
    "rotate_checkpoints",
    "save_file_atomic",
    "save_train_state_json",
    "set_aside_checkpoint",
    "storage_errors",
    "truncate_metrics",
    "verify_checkpoint",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_manifest",
    "write_text_atomic",
]

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
CHECKPOINTS_NAME = "checkpoints"
LOCK_NAME = ".lock"
MANIFEST_NAME = "manifest.json"
TRAIN_STATE_NAME = "train_state.json"
DAMAGED_NAME = "damaged-checkpoints"

_CHECKPOINT_PATTERN = re.compile(r"^(?:step-|checkpoint_)(\d+)$")
_TEMPORARY_PATTERN = re.compile(r"^\..+\.tmp$")
_TORCH_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")


class RunDirectoryWarning(UserWarning):
    """Something in a run directory was skipped or repaired: a half-written metrics line, a
    damaged checkpoint that a resume passed over."""


# ---------------------------------------------------------------------------------------------
# Storage errors


_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_READ_ONLY_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}
# A path that cannot be a folder: a parent that is a file, a name too long, a loop of links.
_BAD_PATH_ERRNOS = {
    errno.ENOTDIR,
    errno.ENAMETOOLONG,
    errno.ELOOP,
    errno.EISDIR,
    errno.EEXIST,
    errno.EINVAL,
}
# What torch's zip writer and safetensors say when a write hits a full disk.
_DISK_FULL_TEXT = ("unexpected pos", "file write failed", "no space left", "os error 28")


def _as_storage_error(error: BaseException, what: str, path: Path) -> GaliError | None:
    """The :class:`GaliError` a failed write maps to, or None when it is no storage problem."""
    code = error.errno if isinstance(error, OSError) else None
    text = str(error).lower()
    if code in _DISK_FULL_ERRNOS or (code is None and any(t in text for t in _DISK_FULL_TEXT)):
        quota = code == getattr(errno, "EDQUOT", -1)
        return CheckpointError(
            f"the disk {'quota is exceeded' if quota else 'is full'}: {what} could not be "
            f"written to {str(path)!r}; the files written before it are intact: free some "
            "space, then continue with --resume"
        )
    if code in _READ_ONLY_ERRNOS:
        reason = os.strerror(code).lower()
        return ConfigError(
            f"cannot write {what} to {str(path)!r} ({reason}): choose a writable --out"
        )
    if code in _BAD_PATH_ERRNOS:
        reason = os.strerror(code).lower()
        return ConfigError(
            f"cannot write {what} to {str(path)!r} ({reason}): expected a path whose parents "
            "are folders; choose another --out"
        )
    return None


@contextlib.contextmanager
def storage_errors(
    what: str, path: str | Path, cleanup: str | Path | None = None
) -> Iterator[None]:
    """Map a write that fails for lack of space or permission to one clear error.

    ``OSError`` with ``ENOSPC``/``EDQUOT``, and the ``RuntimeError`` torch's zip
    writer raises on a full disk (``unexpected pos ...``, ``file write failed``) or the
    ``SafetensorError`` of safetensors (``os error 28``), become a
    :class:`~gali_ext.errors.CheckpointError`; ``EACCES``/``EPERM``/``EROFS`` (a read-only
    folder) a :class:`~gali_ext.errors.ConfigError`. ``cleanup`` (a file or folder, e.g. the
    temporary folder of a checkpoint being saved) is removed on any error, so the previous
    checkpoint stays the newest. Other errors pass through unchanged.
    """
    try:
        yield
    except BaseException as error:
        if cleanup is not None:
            with contextlib.suppress(OSError):  # best effort: the error below matters more
                _remove(Path(cleanup))
        mapped = None
        if isinstance(error, Exception) and not isinstance(error, GaliError):
            mapped = _as_storage_error(error, what, Path(path))
        if mapped is None:
            raise
        raise mapped from error


def _remove(path: Path) -> None:
    """Delete a file, link or folder if it exists (never following a link)."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


# ---------------------------------------------------------------------------------------------
# Atomic files


def _fsync_directory(folder: Path) -> None:
    """Flush a folder's entries (the rename) to disk, where the platform allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temporary_name(path: Path) -> Path:
    """``.<name>.<pid>.tmp`` beside ``path``: hidden, unique per process, removable."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Replace ``path`` by ``data`` atomically: a kill at any moment leaves the old content or
    the new one. The bytes go to a temporary file in the same folder (same file system, so the
    rename is atomic), are flushed with ``fsync``, and the file is renamed over ``path``."""
    path = Path(path)
    temporary = _temporary_name(path)
    with storage_errors(path.name, path, cleanup=temporary):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(temporary, flags, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
        _fsync_directory(path.parent)
    return path


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A temporary path for a writer that takes a file name (``safetensors.torch.save_model``,
    ``torchvision.utils.save_image``); on leaving the block the file is flushed and renamed over
    ``path``, as in :func:`write_bytes_atomic`. On an error it is removed and ``path`` is left
    as it was; a full disk or a read-only folder becomes one clear error (:func:`storage_errors`).

    ``with atomic_output(out / "encoder.safetensors") as tmp: save_model(encoder, str(tmp))``
    """
    path = Path(path)
    temporary = _temporary_name(path)
    with storage_errors(path.name, path, cleanup=temporary):
        yield temporary
        fd = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
        _fsync_directory(path.parent)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """:func:`write_bytes_atomic` of UTF-8 text (``config.json``, ``summary.json``)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, value: Any, indent: int | None = 2) -> Path:
    """:func:`write_bytes_atomic` of ``value`` as JSON (keys sorted, a final newline)."""
    return write_text_atomic(path, json.dumps(value, indent=indent, sort_keys=True) + "\n")


def save_file_atomic(
    tensors: Mapping[str, Any], path: str | Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """``safetensors.torch.save_file`` made atomic (the weights ``*.safetensors`` of a run)."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return write_bytes_atomic(path, save(state, metadata=dict(metadata) if metadata else None))


def remove_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete what a killed writer left: ``.<name>.<pid>.tmp`` files in the run directory and
    its ``checkpoints/``, and ``checkpoints/.tmp-*`` folders. Returns what was removed."""
    run_dir = Path(run_dir)
    removed = []
    for folder in (run_dir, run_dir / CHECKPOINTS_NAME):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            temporary = _TEMPORARY_PATTERN.match(entry.name) or (
                folder.name == CHECKPOINTS_NAME and entry.name.startswith(".tmp-")
            )
            if temporary:
                _remove(entry)
                removed.append(entry)
    return removed


# ---------------------------------------------------------------------------------------------
# metrics.jsonl


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _open_no_link(path: Path, flags: int, what: str) -> int:
    """``os.open(path, flags | O_NOFOLLOW)``: a run file that is a symbolic link is refused
    with a :class:`~gali_ext.errors.ConfigError` instead of being written through (a planted
    ``.lock -> ~/notes.txt`` would truncate the notes)."""
    try:
        return os.open(path, flags | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP or (error.errno == errno.EMLINK and path.is_symlink()):
            raise ConfigError(
                f"{str(path)!r} ({what}) is a symbolic link (to {os.readlink(path)!r}); "
                "gali-ext writes nothing through a link inside a run directory: remove the link"
            ) from None
        raise


def _drop_partial_tail(path: Path) -> None:
    """Cut a last line that has no newline (a kill during an append), with a warning."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with os.fdopen(_open_no_link(path, os.O_RDWR, "the metrics"), "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        keep, end = 0, size
        while end > 0:  # the last newline, read backwards in blocks
            start = max(0, end - 65536)
            f.seek(start)
            found = f.read(end - start).rfind(b"\n")
            if found >= 0:
                keep = start + found + 1
                break
            end = start
        warnings.warn(
            f"{str(path)!r}: dropped a half-written last line ({size - keep} bytes)",
            RunDirectoryWarning,
            stacklevel=3,
        )
        f.truncate(keep)


def append_metrics(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append one JSON record and a newline to ``metrics.jsonl``, flushed.

    A half-written last line left by a kill is cut first (with a :class:`RunDirectoryWarning`),
    so the new record starts on its own line.
    """
    path = Path(path)
    line = json.dumps(dict(record)) + "\n"
    with storage_errors("the metrics", path):
        _drop_partial_tail(path)
        fd = _open_no_link(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "the metrics")
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (none when the file does not exist).

    A record is a line that ends in a newline. A last line without one (a kill during an
    append) is dropped with a :class:`RunDirectoryWarning`; a complete line that is not a JSON
    object raises :class:`~gali_ext.errors.CheckpointError` naming the line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    *lines, tail = data.split(b"\n")
    if tail.strip():
        warnings.warn(
            f"{str(path)!r}: dropped a half-written last line ({len(tail)} bytes)",
            RunDirectoryWarning,
            stacklevel=2,
        )
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise CheckpointError(
                f"{str(path)!r}, line {number}: not a JSON record ({error}); delete the line "
                "or the file"
            ) from error
        if not isinstance(record, dict):
            raise CheckpointError(f"{str(path)!r}, line {number}: expected a JSON object")
        records.append(record)
    return records


def truncate_metrics(path: str | Path, step: int) -> int:
    """Keep the records of steps ``<= step`` (a resume trains the later ones again), rewritten
    atomically; returns how many records were dropped."""
    path = Path(path)
    records = read_metrics(path)
    kept = [r for r in records if int(r.get("step", 0)) <= step]
    if path.exists():
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(records) - len(kept)


# ---------------------------------------------------------------------------------------------
# The lock


def _alive(pid: int | None) -> bool:
    """Whether a process ``pid`` exists (True when it cannot be told)."""
    if not pid:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


ORPHAN_WAIT_S = 30.0
"""How long :class:`RunLock` waits for a lock whose holder has ended: processes it forked
(``DataLoader`` workers) share the lock and exit within seconds of their parent's death."""


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        os.lseek(fd, 0, os.SEEK_SET)
        return int(os.read(fd, 32).decode().strip())
    return None


class RunLock:
    """An advisory lock on a run directory: one process at a time trains into it.

    ``with RunLock(out): ...`` takes ``fcntl.flock`` on ``<out>/.lock`` (creating ``out`` when
    needed) and writes the holder's PID into the file. A second process (a second resume, a
    second fresh run, a second ``--overwrite``) gets a :class:`~gali_ext.errors.ConfigError`
    naming that PID. The kernel drops the lock when its holder exits or is killed, so a crashed
    run never leaves a stale lock. Processes the holder forked (``DataLoader`` workers) share
    the lock until they exit: when the PID in the file has ended, a second process waits up to
    :data:`ORPHAN_WAIT_S` seconds for them instead of failing at once. If this lock created
    ``out`` and nothing but the lock file is in it on release (a start that failed validation),
    ``out`` is removed again.

    Take it on the main process only (``accelerator.is_main_process``): every rank of a
    multi-process run shares the directory. Platforms without ``fcntl`` (Windows) get a
    :class:`RunDirectoryWarning` and no lock.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self._created = False

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`~gali_ext.errors.ConfigError` naming the holder."""
        if self._fd is not None:
            return self
        try:
            import fcntl
        except ImportError:
            warnings.warn(
                "no fcntl on this platform: the run directory is not locked",
                RunDirectoryWarning,
                stacklevel=2,
            )
            return self
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(f"{str(self.run_dir)!r} is a file, not a run directory")
        self._created = not self.run_dir.exists()
        with storage_errors("the run lock", self.path):
            self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = self._lock(fcntl)
        except BaseException:
            if self._created:
                with contextlib.suppress(OSError):
                    self.run_dir.rmdir()
            raise
        self._fd = fd
        return self

    def _lock(self, fcntl: Any) -> int:
        deadline = time.monotonic() + ORPHAN_WAIT_S
        with storage_errors("the run lock", self.path):
            while True:
                fd = _open_no_link(self.path, os.O_RDWR | os.O_CREAT, "the run lock")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_pid(fd)
                    os.close(fd)
                    # A killed holder's forked children (DataLoader workers) keep the lock
                    # until they notice and exit: wait for them, not for a live holder.
                    if not _alive(holder) and time.monotonic() < deadline:
                        time.sleep(0.2)
                        continue
                    ended = "" if _alive(holder) else ", which has ended; processes it started"
                    ended += " still hold the lock" if ended else ""
                    raise ConfigError(
                        f"{str(self.run_dir)!r} is in use by another process (PID "
                        f"{holder if holder else 'unknown'}{ended}, lock {str(self.path)!r}): "
                        "wait for it to end or stop it; two processes must not train into one "
                        "run directory"
                    ) from None
                # A releasing holder may have removed the file between our open and flock:
                # the lock counts only on the file that is at the path now.
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except BaseException:
                os.close(fd)
                raise
        return fd

    def release(self) -> None:
        """Drop the lock (and the directory, when this lock made it and it stayed empty)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            leftover = [e.name for e in self.run_dir.iterdir()] if self.run_dir.is_dir() else []
            if self._created and leftover == [LOCK_NAME]:
                self.path.unlink()
                self.run_dir.rmdir()
            else:
                os.ftruncate(fd, 0)
        except OSError:
            pass  # the lock itself goes with the descriptor below
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------
# What a run directory is; --overwrite


def _visible_entries(folder: Path) -> list[Path]:
    """The entries of a folder other than the lock and temporaries of killed writers."""
    return [
        e for e in folder.iterdir() if e.name != LOCK_NAME and not _TEMPORARY_PATTERN.match(e.name)
    ]


_RUN_CONFIG_KEYS = frozenset({"name", "spec", "dataset", "arch"})


def _is_recipe_config(path: Path) -> bool:
    """Whether ``path`` is a run's config.json: a JSON object with the keys a
    :class:`~gali_ext.recipes.RecipeConfig` always writes (``name``, ``spec``, ``dataset``,
    ``arch``). A symbolic link, an empty file or a project's own ``config.json`` is not one."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and _RUN_CONFIG_KEYS <= data.keys()


def _has_our_manifest(checkpoint: Path) -> bool:
    """Whether a checkpoint folder holds a ``manifest.json`` that gali-ext wrote (an object
    with ``format`` and ``files``)."""
    try:
        data = json.loads((checkpoint / MANIFEST_NAME).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and {"format", "files"} <= data.keys()


def is_run_directory(path: str | Path) -> bool:
    """Whether ``path`` is a folder a recipe run wrote, told by a marker only gali-ext writes:
    a ``config.json`` that is a recipe config (:func:`_is_recipe_config`), or a checkpoint
    ``checkpoints/checkpoint_N`` with gali-ext's ``manifest.json``.

    A ``checkpoints/`` folder or a ``metrics.jsonl`` alone do not make a run: a project's own
    ``checkpoints/epoch=3.ckpt``, a thesis with ``data/``, a project's ``config.json`` are not
    runs, and nothing of them is ever deleted."""
    path = Path(path)
    if not path.is_dir():
        return False
    if _is_recipe_config(path / CONFIG_NAME):
        return True
    root = path / CHECKPOINTS_NAME
    if root.is_symlink():
        return False
    return any(_has_our_manifest(c) for c in list_checkpoints(root))


RUN_FILES = (
    CONFIG_NAME,
    METRICS_NAME,
    "summary.json",
    "samples.png",
    "reconstructions.png",
    "encoder.safetensors",
    "generator.safetensors",
    "discriminator.safetensors",
    "encoder_ema.safetensors",
    "generator_ema.safetensors",
)
"""The files gali-ext writes at the top of a run directory (docs/design.md, section 10.1)."""
RUN_FOLDERS = (CHECKPOINTS_NAME, DAMAGED_NAME, "grids", "logs")
"""The folders gali-ext writes in a run directory; inside them it removes only its own
entries (:func:`clear_run_directory`)."""

_GRID_PATTERN = re.compile(r"^(?:samples|reconstructions)_step\d+\.png$")
_DAMAGED_PATTERN = re.compile(r"^(?:step-|checkpoint_)\d+(?:-\d+)?$")


def check_out_path(out: str | Path) -> None:
    """Refuse an ``--out`` that cannot be a folder (a parent that is a file, a name too long,
    a loop of links) with a :class:`~gali_ext.errors.ConfigError`, before anything is done."""
    try:
        os.stat(out)
    except FileNotFoundError:
        return
    except OSError as error:
        mapped = _as_storage_error(error, "the run directory", Path(out))
        if mapped is None:
            raise
        raise mapped from None


def check_no_links(out: str | Path) -> None:
    """Refuse a run directory where a name gali-ext writes (``.lock``, ``config.json``,
    ``metrics.jsonl``, ``checkpoints/``, the weights, ...) is a symbolic link: writing or
    rotating through it would change files outside the run. Raises
    :class:`~gali_ext.errors.ConfigError` naming the link and its target."""
    out = Path(out)
    if not out.is_dir():
        return
    for name in (LOCK_NAME, *RUN_FILES, *RUN_FOLDERS):
        path = out / name
        if path.is_symlink():
            target = os.readlink(path)
            raise ConfigError(
                f"{str(path)!r} is a symbolic link (to {target!r}); gali-ext writes nothing "
                f"through a link inside a run directory: replace it by a plain "
                f"{'folder' if name in RUN_FOLDERS else 'file'} or remove it"
            )


def check_overwrite(out: str | Path) -> bool:
    """Check that ``--overwrite`` may empty ``out``; returns whether it holds anything.

    Raises :class:`~gali_ext.errors.ConfigError` when ``out`` is a symbolic link (nothing is
    deleted through a link: the message names the real folder), a file, or a folder that is
    not a run directory (:func:`is_run_directory`).
    """
    out = Path(out)
    if out.is_symlink():
        target = Path(os.path.realpath(out))
        raise ConfigError(
            f"--overwrite: {str(out)!r} is a symbolic link to {str(target)!r}; gali-ext deletes "
            f"nothing through a link: pass --out {str(target)!r} if that is the run to replace"
        )
    if not out.exists():
        return False
    if not out.is_dir():
        raise ConfigError(f"{str(out)!r} is a file, not a run directory")
    entries = _visible_entries(out)
    if not entries:
        return False
    if not is_run_directory(out):
        names = sorted(e.name + ("/" if e.is_dir() else "") for e in entries)
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise ConfigError(
            f"--overwrite: {str(out)!r} is not a run directory (no gali-ext config.json or "
            f"checkpoint manifest; it holds {shown}): refusing to delete it; choose another --out"
        )
    check_no_links(out)
    return True


def _run_name(out: Path) -> str | None:
    """The recipe name in ``out/config.json`` (the tracker folder ``logs/NAME``), if any."""
    try:
        name = json.loads((out / CONFIG_NAME).read_text())["name"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return name if isinstance(name, str) and name and Path(name).name == name else None


def _own_entries(out: Path) -> list[Path]:
    """What gali-ext wrote in run directory ``out`` (files and folders of its layout, and
    temporaries of killed writers), but the lock; links among them are listed, to be removed
    (never followed)."""
    own: list[Path] = []
    for entry in out.iterdir():
        if entry.name in RUN_FILES or _TEMPORARY_PATTERN.match(entry.name):
            own.append(entry)
    sub = {name: out / name for name in RUN_FOLDERS}
    for name, folder in sub.items():
        if folder.is_symlink():
            own.append(folder)
        elif folder.is_dir():
            for entry in folder.iterdir():
                if _is_own_entry(name, entry.name, out):
                    own.append(entry)
    return own


def _is_own_entry(folder: str, name: str, out: Path) -> bool:
    """Whether ``name`` in the run folder ``folder`` (one of :data:`RUN_FOLDERS`) is gali-ext's."""
    if folder == CHECKPOINTS_NAME:
        temporary = name.startswith(".tmp-") or _TEMPORARY_PATTERN.match(name)
        return checkpoint_number(name) is not None or bool(temporary)
    if folder == DAMAGED_NAME:
        return bool(_DAMAGED_PATTERN.match(name))
    if folder == "grids":
        return bool(_GRID_PATTERN.match(name) or _TEMPORARY_PATTERN.match(name))
    return folder == "logs" and name == _run_name(out)


def clear_run_directory(out: str | Path) -> list[str]:
    """Delete what gali-ext wrote in ``out`` (call it holding the :class:`RunLock`, after
    :func:`check_overwrite`): the files of its layout (:data:`RUN_FILES`), its own entries in
    ``checkpoints/``, ``damaged-checkpoints/``, ``grids/`` and ``logs/`` (those folders too
    once empty), and temporaries. Anything else (a user's ``notes.txt``, ``data/``,
    ``checkpoints/best_step5``) is left where it is and returned by its path relative to
    ``out`` (``notes.txt``, ``data/``, ``checkpoints/best_step5/``), for the caller to mention.
    Links are removed, never followed."""
    out = Path(out)
    with storage_errors("the old run", out):
        for entry in _own_entries(out):
            _remove(entry)
        for name in RUN_FOLDERS:
            folder = out / name
            if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
                folder.rmdir()
    kept = []
    for entry in sorted(out.iterdir()):
        inside = entry.name in RUN_FOLDERS and entry.is_dir() and not entry.is_symlink()
        for path in sorted(entry.iterdir()) if inside else [entry]:
            if path.name != LOCK_NAME:
                slash = "/" if path.is_dir() and not path.is_symlink() else ""
                kept.append(path.relative_to(out).as_posix() + slash)
    return kept


def foreign_checkpoint_entries(out: str | Path) -> list[str]:
    """The names in ``out/checkpoints`` that gali-ext did not write (``NOTES.txt``,
    ``.DS_Store``, a user's ``best_step5`` copy): rotation leaves them alone."""
    root = Path(out) / CHECKPOINTS_NAME
    if not root.is_dir() or root.is_symlink():
        return []
    return sorted(
        e.name + ("/" if e.is_dir() else "")
        for e in root.iterdir()
        if checkpoint_number(e) is None
        and not e.name.startswith(".tmp-")
        and not _TEMPORARY_PATTERN.match(e.name)
    )


def rotate_checkpoints(out: str | Path, keep: int) -> list[Path]:
    """Delete gali-ext's oldest checkpoint folders (``checkpoint_N``, ``step-N``) beyond the
    newest ``keep``; anything else in ``checkpoints/`` is never touched. Call it after a save
    has finished (its manifest written), so that a kill at any moment leaves ``keep``
    complete checkpoints. Returns what was removed."""
    found = [c for c in list_checkpoints(Path(out) / CHECKPOINTS_NAME) if not c.is_symlink()]
    removed = found[: max(0, len(found) - keep)]
    with storage_errors("the checkpoint rotation", Path(out) / CHECKPOINTS_NAME):
        for folder in removed:
            shutil.rmtree(folder)
    return removed


# ---------------------------------------------------------------------------------------------
# Checkpoints: names, manifest, verification


def checkpoint_number(path: str | Path) -> int | None:
    """The number in a checkpoint folder's name (``step-0001000`` -> 1000, Accelerate's
    ``checkpoint_3`` -> 3), or None for other names (temporaries, ``.tmp-step-...``)."""
    match = _CHECKPOINT_PATTERN.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(root: str | Path) -> list[Path]:
    """The checkpoint folders under ``root``, oldest first, sorted by number (so
    ``step-9999999`` comes before ``step-10000000``)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_number(p) is not None]
    return sorted(found, key=lambda p: (checkpoint_number(p), p.name))


def _checkpoint_files(folder: Path) -> dict[str, Path]:
    """Every file below ``folder`` by its relative POSIX path, except the manifest and
    temporaries."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        relative = path.relative_to(folder).as_posix()
        if relative == MANIFEST_NAME or _TEMPORARY_PATTERN.match(path.name):
            continue
        files[relative] = path
    return files


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(checkpoint_dir: str | Path, step: int | None = None) -> Path:
    """Write ``manifest.json`` into a checkpoint: the size and SHA-256 of every file in it.

    Call it last, after every process has written its files: a checkpoint without a manifest is
    one whose save did not finish. Written atomically.
    """
    folder = Path(checkpoint_dir)
    files = {}
    with storage_errors("the checkpoint manifest", folder):
        for name, path in _checkpoint_files(folder).items():
            files[name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"format": 1, "step": step, "files": files}
    return write_json_atomic(folder / MANIFEST_NAME, manifest)


def _required_files(num_processes: int) -> list[str]:
    return [TRAIN_STATE_NAME] + [f"random_states_{i}.pkl" for i in range(num_processes)]


def verify_checkpoint(checkpoint_dir: str | Path, num_processes: int = 1) -> list[str]:
    """What is wrong with a checkpoint; an empty list when it is intact.

    Intact: ``manifest.json`` reads, every file it lists has its size and SHA-256, no other
    file is there (a planted ``custom_checkpoint_0.pkl`` is a problem), and it holds
    ``train_state.json`` and the random states of each of the ``num_processes`` processes
    (without them a resume would silently draw other random numbers).
    """
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return [f"{folder.name} is not a folder"]
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        listed = manifest["files"]
        if not isinstance(listed, dict):
            raise TypeError("files is not an object")
    except FileNotFoundError:
        return [f"no {MANIFEST_NAME} (its save did not finish, or an older gali-ext wrote it)"]
    except (OSError, ValueError, TypeError, KeyError) as error:
        return [f"{MANIFEST_NAME} is damaged ({error})"]
    problems = []
    present = _checkpoint_files(folder)
    for name, entry in listed.items():
        path = present.get(name)
        if path is None:
            problems.append(f"{name} is missing")
            continue
        if path.is_symlink():
            problems.append(f"{name} is a symbolic link")
            continue
        try:
            size = path.stat().st_size
            if size != entry["size"]:
                problems.append(f"{name} has {size} bytes, the manifest says {entry['size']}")
            elif _sha256(path) != entry["sha256"]:
                problems.append(f"{name} differs from the manifest (SHA-256)")
        except (OSError, TypeError, KeyError) as error:
            problems.append(f"{name} cannot be checked ({error})")
    for name in present:
        if name not in listed:
            problems.append(f"{name} is not in the manifest")
    for name in _required_files(num_processes):
        if name not in listed:
            problems.append(f"{name} is missing from the checkpoint")
    return problems


def newest_intact_checkpoint(
    checkpoints_root: str | Path, num_processes: int = 1, deep: bool = True
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that is intact, and the newer ones skipped with their reasons.

    A checkpoint is intact when :func:`verify_checkpoint` finds nothing and, with ``deep``,
    :func:`load_checkpoint_files` reads every file safely. The caller warns about the skipped
    ones (:func:`set_aside_checkpoint` moves them out of the way). ``(None, skipped)`` when no
    checkpoint is intact.
    """
    skipped: list[tuple[Path, str]] = []
    for checkpoint in reversed(list_checkpoints(checkpoints_root)):
        problems = verify_checkpoint(checkpoint, num_processes)
        if not problems and deep:
            try:
                load_checkpoint_files(checkpoint, num_processes)
                load_train_state_json(checkpoint)
            except CheckpointError as error:
                problems = [str(error)]
        if not problems:
            return checkpoint, skipped
        skipped.append((checkpoint, "; ".join(problems)))
    return None, skipped


def set_aside_checkpoint(checkpoint: str | Path, run_dir: str | Path) -> Path:
    """Move a damaged checkpoint to ``<run>/damaged-checkpoints/`` (kept for inspection, out of
    the way of the next save and of Accelerate's checkpoint rotation); returns its new path."""
    checkpoint, target_root = Path(checkpoint), Path(run_dir) / DAMAGED_NAME
    target = target_root / checkpoint.name
    count = 1
    while target.exists():
        count += 1
        target = target_root / f"{checkpoint.name}-{count}"
    with storage_errors("the damaged checkpoint", target):
        target_root.mkdir(parents=True, exist_ok=True)
        os.replace(checkpoint, target)
    return target


# ---------------------------------------------------------------------------------------------
# Safe loading


def _safe_globals() -> list[Any]:
    """What Accelerate's ``random_states_N.pkl`` needs beyond tensors: numpy arrays (the
    Mersenne-Twister state) rebuilt from their bytes. No class that runs code."""
    import codecs

    import numpy as np

    core = getattr(np, "_core", None) or np.core
    names = [core.multiarray._reconstruct, np.ndarray, np.dtype, codecs.encode]
    names += [np.dtypes.UInt32DType] if hasattr(np, "dtypes") else []
    return names


def load_torch_file(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors, numbers, strings and
    containers only (plus numpy arrays, for random states); never an arbitrary class.

    A file holding anything else raises :class:`~gali_ext.errors.CheckpointError` naming the
    first refused global (loading it would run code); a damaged one names the file.
    """
    import pickle

    import torch

    path = Path(path)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise CheckpointError(f"{str(path)!r} does not exist") from error
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"refusing to load {str(path)!r}: it holds a Python object{what} that is not a "
            "tensor, number, string or container; loading it could run arbitrary code"
        ) from error
    except Exception as error:  # torch's zip reader raises RuntimeError, EOFError, ...
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(
            f"{str(path)!r} is damaged ({type(error).__name__}: {first})"
        ) from error


def load_checkpoint_files(checkpoint_dir: str | Path, num_processes: int = 1) -> dict[str, Any]:
    """Read every file of a checkpoint without running code from it, by relative name.

    ``*.safetensors`` with safetensors, ``*.json`` as JSON, torch files (``.bin``, ``.pkl``,
    ``.pt``, ``.pth``) with :func:`load_torch_file`; any other file raises
    :class:`~gali_ext.errors.CheckpointError`. The random states of each process must hold the
    Python, numpy and torch generator states Accelerate restores.
    """
    from safetensors.torch import load_file

    folder = Path(checkpoint_dir)
    loaded: dict[str, Any] = {}
    for name, path in _checkpoint_files(folder).items():
        if path.is_symlink():
            raise CheckpointError(f"{str(path)!r} is a symbolic link; a checkpoint holds files")
        if path.suffix == ".safetensors":
            try:
                loaded[name] = load_file(str(path))
            except Exception as error:  # SafetensorError on a damaged file
                raise CheckpointError(f"{str(path)!r} is damaged ({error})") from error
        elif path.suffix == ".json":
            try:
                loaded[name] = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                raise CheckpointError(f"{str(path)!r} is damaged ({error})") from error
        elif path.suffix in _TORCH_SUFFIXES:
            loaded[name] = load_torch_file(path)
        else:
            raise CheckpointError(
                f"{str(path)!r}: a checkpoint holds .safetensors, .json and torch tensor files "
                f"({', '.join(_TORCH_SUFFIXES)}), not this one"
            )
    for i in range(num_processes):
        name = f"random_states_{i}.pkl"
        states = loaded.get(name)
        needed = ("random_state", "numpy_random_seed", "torch_manual_seed")
        if not isinstance(states, dict) or any(k not in states for k in needed):
            raise CheckpointError(
                f"{str(folder / name)!r} is missing or lacks the generator states "
                f"{', '.join(needed)}: resuming would not reproduce the run"
            )
    return loaded


def save_train_state_json(checkpoint_dir: str | Path, state: Mapping[str, Any]) -> Path:
    """The loop's own state (step, epoch, batches drawn: JSON values only) as
    ``train_state.json`` in a checkpoint, atomically.

    It replaces ``accelerator.register_for_checkpointing``, whose ``custom_checkpoint_N.pkl``
    Accelerate always loads with ``weights_only=False`` (arbitrary code on resume).
    """
    return write_json_atomic(Path(checkpoint_dir) / TRAIN_STATE_NAME, dict(state))


def load_train_state_json(checkpoint_dir: str | Path) -> dict[str, Any]:
    """``train_state.json`` of a checkpoint (see :func:`save_train_state_json`)."""
    path = Path(checkpoint_dir) / TRAIN_STATE_NAME
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise CheckpointError(f"{str(path)!r} does not exist") from error
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{str(path)!r} is damaged ({error})") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r}: expected a JSON object")
    step, world = state.get("step"), state.get("world_size")
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        raise CheckpointError(f"{str(path)!r}: expected a step that is an int >= 0, got {step!r}")
    world_ok = isinstance(world, int) and not isinstance(world, bool) and world >= 1
    if world is not None and not world_ok:
        raise CheckpointError(
            f"{str(path)!r}: expected a world_size that is an int >= 1, got {world!r}"
        )
    try:
        listed = json.loads((Path(checkpoint_dir) / MANIFEST_NAME).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        listed = None
    if listed is not None and listed != step:
        raise CheckpointError(
            f"{str(path)!r} says step {step}, the checkpoint's manifest step {listed}"
        )
    return state


def load_state_safely(accelerator: Any, checkpoint_dir: str | Path) -> dict[str, Any]:
    """``accelerator.load_state`` that never unpickles an arbitrary class; returns the loop's
    state from ``train_state.json``.

    1. refuses an accelerator with objects registered for checkpointing (Accelerate loads
       them with ``weights_only=False``);
    2. :func:`verify_checkpoint` (manifest, sizes, hashes, no unlisted file);
    3. :func:`load_checkpoint_files` (every torch file with ``weights_only=True``);
    4. ``accelerator.load_state(..., load_kwargs={"weights_only": True})``;
    5. checks that the torch generator state was restored (Accelerate only logs a failure).
    """
    import torch

    if getattr(accelerator, "_custom_objects", None):
        raise ConfigError(
            "objects registered with accelerator.register_for_checkpointing are loaded with "
            "weights_only=False by Accelerate: keep the loop's state in train_state.json "
            "(save_train_state_json) instead"
        )
    checkpoint = Path(checkpoint_dir)
    problems = verify_checkpoint(checkpoint, accelerator.num_processes)
    if problems:
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} is damaged: {'; '.join(problems)}")
    files = load_checkpoint_files(checkpoint, accelerator.num_processes)
    saved = files[f"random_states_{accelerator.process_index}.pkl"]["torch_manual_seed"]
    del files
    accelerator.load_state(str(checkpoint), load_kwargs={"weights_only": True})
    if not torch.equal(torch.get_rng_state(), saved):
        raise CheckpointError(
            f"the random states of {str(checkpoint)!r} were not restored: resuming would not "
            "reproduce the run"
        )
    return load_train_state_json(checkpoint)


# ---------------------------------------------------------------------------------------------
# Resume policy


@dataclass(frozen=True)
class ResumeDecision:
    """What ``--resume`` does with a run directory (:func:`resume_decision`).

    ``action`` is ``"fresh"`` (nothing trained yet: start at step 0) or ``"continue"`` (from
    ``checkpoint``); ``skipped`` lists newer checkpoints passed over, with the reason;
    ``reason`` says why, for the log.
    """

    action: str
    checkpoint: Path | None = None
    skipped: tuple[tuple[Path, str], ...] = ()
    reason: str = ""


def _trained_evidence(out: Path) -> list[str]:
    """What in ``out`` shows that training passed a checkpoint: exported weights (written with
    each checkpoint), ``summary.json``, or metrics of a step after the first checkpoint."""
    evidence = [p.name for p in sorted(out.glob("*.safetensors"))]
    if (out / "summary.json").is_file():
        evidence.append("summary.json")
    try:
        config = json.loads((out / CONFIG_NAME).read_text())
        every = int(config["checkpoint_every"])
    except (OSError, ValueError, TypeError, KeyError):
        every = None
    if every is not None and (out / METRICS_NAME).is_file():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RunDirectoryWarning)
            try:
                steps = [int(r.get("step", 0)) for r in read_metrics(out / METRICS_NAME)]
            except CheckpointError:
                steps = []
        if steps and max(steps) > every:
            evidence.append(f"metrics up to step {max(steps)}")
    return evidence


def adopt_checkpoint(checkpoint: str | Path, num_processes: int = 1) -> Path:
    """Give a checkpoint without ``manifest.json`` (written by gali-ext 0.1.0, whose
    checkpoints are ``step-NNNNNNN`` folders with the loop's state in
    ``custom_checkpoint_0.pkl``) the files a resume needs: ``train_state.json`` (the step from
    that file, read as tensors only, or from the folder's name) and a manifest of the files as
    they are now (``--trust-checkpoint``). A file damaged before this call cannot be told any
    more. Raises :class:`~gali_ext.errors.CheckpointError` when a file holds anything but
    tensors or the step cannot be told."""
    folder = Path(checkpoint)
    load_checkpoint_files(folder, num_processes)  # every file as tensors only; random states
    if not (folder / TRAIN_STATE_NAME).is_file():
        step = None
        custom = folder / "custom_checkpoint_0.pkl"
        if custom.is_file():
            saved = load_torch_file(custom)
            step = saved.get("step") if isinstance(saved, dict) else None
            # Accelerate refuses custom_checkpoint_N files when nothing is registered: keep
            # 0.1.0's loop state under a name it does not read
            os.replace(custom, folder / "loop_state_0.1.0.pkl")
        if step is None and folder.name.startswith("step-"):
            step = checkpoint_number(folder)
        if not isinstance(step, int) or step < 0:
            raise CheckpointError(
                f"--trust-checkpoint: cannot tell the step of {str(folder)!r} (no "
                f"{TRAIN_STATE_NAME}, no step in custom_checkpoint_0.pkl or in its name)"
            )
        save_train_state_json(folder, {"step": step, "world_size": num_processes})
    write_manifest(folder, load_train_state_json(folder)["step"])
    return folder


def resume_decision(
    out_dir: str | Path, num_processes: int = 1, trust: bool = False
) -> ResumeDecision:
    """What ``--resume`` must do with ``out_dir``: continue, start fresh, or stop.

    - no directory, an empty one, or a run stopped before its first checkpoint was finished
      (``config.json``, perhaps metrics of the first steps and a checkpoint folder without a
      manifest, but no weights): ``"fresh"``; ``skipped`` lists unfinished checkpoints;
    - an intact checkpoint: ``"continue"`` from the newest one
      (:func:`newest_intact_checkpoint`), ``skipped`` naming the newer damaged ones;
    - checkpoints, none intact, and a trained run: :class:`~gali_ext.errors.CheckpointError`
      listing why each was refused;
    - no checkpoint but trained weights, ``summary.json`` or metrics past ``checkpoint_every``
      (``checkpoints/`` deleted): :class:`~gali_ext.errors.ConfigError`; starting over would
      overwrite the trained run;
    - a folder of other files: :class:`~gali_ext.errors.ConfigError`.

    A fresh start empties the directory first (:func:`clear_run_directory`). With ``trust``
    (``--trust-checkpoint``), the newest checkpoint without a manifest (a run of gali-ext
    0.1.0) is adopted (:func:`adopt_checkpoint`, with a :class:`RunDirectoryWarning`) when no
    checkpoint is intact.
    """
    out = Path(out_dir)
    if not out.exists():
        return ResumeDecision("fresh", reason=f"{str(out)!r} does not exist yet")
    if not out.is_dir():
        raise ConfigError(f"--resume: {str(out)!r} is a file, not a run directory")
    if not _visible_entries(out):
        return ResumeDecision("fresh", reason=f"{str(out)!r} is empty")
    if not is_run_directory(out):
        names = ", ".join(sorted(e.name for e in _visible_entries(out))[:5])
        raise ConfigError(
            f"--resume: {str(out)!r} holds no run (no gali-ext config.json or checkpoint "
            f"manifest; it holds {names}): nothing was touched; choose another --out"
        )
    evidence = _trained_evidence(out)
    skipped: list[tuple[Path, str]] = []
    if list_checkpoints(out / CHECKPOINTS_NAME):
        best, skipped = newest_intact_checkpoint(out / CHECKPOINTS_NAME, num_processes)
        if best is not None:
            return ResumeDecision("continue", best, tuple(skipped), f"resuming from {best.name}")
        unfinished = all(reason.startswith(f"no {MANIFEST_NAME}") for _, reason in skipped)
        old_layout = [p for p, reason in skipped if reason.startswith(f"no {MANIFEST_NAME}")]
        if evidence and old_layout and trust:
            adopted = adopt_checkpoint(old_layout[0], num_processes)
            warnings.warn(
                f"--trust-checkpoint: {adopted.name} had no {MANIFEST_NAME} (gali-ext 0.1.0 "
                "wrote none); its files were read as tensors only and a manifest was written "
                "for them: damage done to it before this resume cannot be detected",
                RunDirectoryWarning,
                stacklevel=2,
            )
            newer = tuple(skipped[: [p for p, _ in skipped].index(adopted)])
            return ResumeDecision("continue", adopted, newer, f"resuming from {adopted.name}")
        if evidence or not unfinished:
            why = "; ".join(f"{p.name}: {reason}" for p, reason in skipped)
            advice = "pass --overwrite to start it over"
            if old_layout:
                advice = (
                    f"if {old_layout[0].name} was written by gali-ext 0.1.0 (no manifest), pass "
                    "--trust-checkpoint to resume from it (its files are read as tensors "
                    "only), or --overwrite to start over"
                )
            raise CheckpointError(
                f"--resume: no intact checkpoint in {str(out / CHECKPOINTS_NAME)!r} ({why}); "
                f"the run cannot continue exactly: {advice}"
            )
    elif evidence:
        raise ConfigError(
            f"--resume: {str(out)!r} holds a trained run ({', '.join(evidence)}) but no "
            "checkpoint to continue from; starting over would overwrite it: restore "
            "checkpoints/, or pass --overwrite to start over"
        )
    return ResumeDecision(
        "fresh", skipped=tuple(skipped), reason="the run stopped before its first checkpoint"
    )


RESUME_APPLIED = frozenset(
    {
        "steps",
        "lr",
        "betas",
        "instance_noise",
        "log_every",
        "sample_every",
        "checkpoint_every",
        "keep_checkpoints",
        "data_dir",
        "download",
        "channels_last",
        "description",
        "num_workers",
        "log_with",
    }
)
"""Settings a resume may change: each takes effect from the resumed step on (``lr`` and
``betas`` through :func:`apply_optimizer_settings`; ``num_workers`` and ``log_with`` change
how data is read and where metrics go, not what is trained). Every other setting is fixed by
the checkpoint (model, data, batch, objective, optimizer, precision, seed, ``ema_decay``);
``download`` only says whether missing data files may be fetched (verified) before the run."""


def _settings(config: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    return dict(config)


def check_resume_overrides(saved_config: Any, new_config: Any) -> dict[str, tuple[Any, Any]]:
    """The settings that differ between a run's ``config.json`` and a resume's, as
    ``{name: (old, new)}``, when all of them may change (:data:`RESUME_APPLIED`).

    Any other difference raises :class:`~gali_ext.errors.ConfigError` naming each refused
    setting with its old and new value. Accepts two :class:`~gali_ext.recipes.RecipeConfig` or
    two mappings. Write the new ``config.json`` only once the resumed run has started.
    """
    old, new = _settings(saved_config), _settings(new_config)
    changed = {}
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            a, b = tuple(a), tuple(b)
        if a != b:
            changed[key] = (a, b)
    refused = {k: v for k, v in changed.items() if k not in RESUME_APPLIED}
    if refused:
        detail = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in refused.items())
        raise ConfigError(
            f"--resume cannot change {detail}: the checkpoint was trained with the old value; "
            f"start a new run (another --out) to change it. A resume may change: "
            f"{', '.join(sorted(RESUME_APPLIED))}"
        )
    return changed


def apply_optimizer_settings(
    optimizer: Any, lr: float, betas: Sequence[float] | None = None
) -> list[str]:
    """Set ``lr`` (and ``betas`` where the optimizer has them) in every parameter group.

    ``accelerator.load_state`` restores the saved param groups, old learning rate included, so
    a resume with ``--set lr=...`` must call this after loading. Returns one line per change,
    for the log (``lr 0.0001 -> 0.001``); none when nothing changed.
    """
    changes = []
    for group in optimizer.param_groups:
        if group.get("lr") != lr:
            changes.append(f"lr {group.get('lr')} -> {lr}")
            group["lr"] = lr
        if betas is not None and "betas" in group and tuple(group["betas"]) != tuple(betas):
            changes.append(f"betas {tuple(group['betas'])} -> {tuple(betas)}")
            group["betas"] = tuple(betas)
    return sorted(set(changes))
