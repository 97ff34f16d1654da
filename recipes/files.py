"""Files that survive ``kill -9`` and a full disk (docs/design.md, section 10).

- **atomic files** (:func:`write_bytes_atomic`, :func:`write_text_atomic`,
  :func:`write_json_atomic`, :func:`save_file_atomic`, :func:`atomic_output`): written to a
  temporary name in the same folder, flushed to disk (``fsync``) and renamed over the target
  (``os.replace``), so a kill at any moment leaves either the old file or the new one, never a
  truncated one;
- **metrics** (:func:`append_metrics`, :func:`read_metrics`, :func:`truncate_metrics`): one JSON
  record per line; a half-written last line (a kill during an append) is dropped with a
  :class:`RunDirectoryWarning`;
- **storage errors** (:func:`storage_errors`): a full disk or a read-only folder becomes one
  clear :class:`~gali_ext.errors.CheckpointError` or :class:`~gali_ext.errors.ConfigError`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save

from gali_ext.errors import CheckpointError, ConfigError, GaliError

__all__ = [
    "RunDirectoryWarning",
    "TEMPORARY_PATTERN",
    "append_metrics",
    "atomic_output",
    "fsync_directory",
    "open_no_follow",
    "read_metrics",
    "remove_path",
    "save_file_atomic",
    "storage_error",
    "storage_errors",
    "truncate_metrics",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]


class RunDirectoryWarning(UserWarning):
    """Something in a run directory was skipped or repaired: a half-written metrics line, a
    damaged checkpoint that a resume passed over."""


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


def storage_error(error: BaseException, what: str, path: Path) -> GaliError | None:
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
                remove_path(Path(cleanup))
        mapped = None
        if isinstance(error, Exception) and not isinstance(error, GaliError):
            mapped = storage_error(error, what, Path(path))
        if mapped is None:
            raise
        raise mapped from error


def remove_path(path: Path) -> None:
    """Delete a file, link or folder if it exists (never following a link)."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def fsync_directory(folder: Path) -> None:
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
        fsync_directory(path.parent)
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
        fsync_directory(path.parent)


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

    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return write_bytes_atomic(path, save(state, metadata=dict(metadata) if metadata else None))


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def open_no_follow(path: Path, flags: int, what: str) -> int:
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
    with os.fdopen(open_no_follow(path, os.O_RDWR, "the metrics"), "rb+") as f:
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
        fd = open_no_follow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "the metrics")
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


TEMPORARY_PATTERN = re.compile(r"^\..+\.tmp$")
