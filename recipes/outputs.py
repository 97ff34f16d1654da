"""Where a command writes (docs/design.md, section 10.12): every output path is checked once,
before any work starts, by :func:`check_output_path`.

Every ``gali-ext`` command calls it on each path it is going to write to (``--out``;
``--data-dir`` with ``--download``; ``--evaluator`` when an evaluator is trained there; an
export folder; a run's tracker folder) before it reads data, trains or measures anything. A path
is refused with one :class:`~gali_ext.errors.ConfigError` line when it

- is empty (``--out ''`` would mean the current folder);
- is a symbolic link (gali-ext writes nothing through a link);
- is a file where a folder goes, or a folder where a file goes; holds files where a new folder
  goes (an export);
- lies among a run directory's own entries (:func:`.rundir.owning_run`: its ``checkpoints/``,
  ``grids/``, ``logs/``, its weights, ...), where another command's files would be taken for the
  run's, or removed by its rotation;
- cannot be written: a parent is a file, a name is too long, or the folder it would be created
  in refuses new entries (permissions, a read-only file system, ``/proc``);
- is a file to write whose folder does not exist.

The check creates nothing that stays. Whether a folder takes new entries is asked of the folder
itself, not read from its permission bits (which do not bind root, and say nothing of read-only
file systems or ``/proc``): an unnamed file is opened in it (``O_TMPFILE``, which never appears
in the folder) and closed; on a file system without unnamed files an empty folder with a unique
hidden name is created and removed at once.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

from gali_ext.errors import ConfigError
from gali_ext.recipes.rundir import RUN_FOLDERS, owning_run

__all__ = ["OUTPUT_KINDS", "check_output_path"]

OUTPUT_KINDS = ("folder", "file", "new folder")
"""What a command writes at a path: ``folder`` (created with its parents when missing, files
written into it), ``file`` (written or replaced atomically, in a folder that exists) or
``new folder`` (created, or an empty folder replaced, by a rename: ``gali-ext export``)."""

# What opening an unnamed file fails with where the file system (or the kernel) has none.
_NO_UNNAMED_FILES = {
    errno.EOPNOTSUPP,
    getattr(errno, "ENOTSUP", errno.EOPNOTSUPP),
    errno.EISDIR,
    errno.EINVAL,
}


def check_output_path(
    path: str | os.PathLike[str],
    option: str = "--out",
    *,
    kind: str = "folder",
    run: str | os.PathLike[str] | None = None,
) -> Path:
    """``path`` as a :class:`Path` once it is a place ``option`` may write (the module docstring
    lists what is refused); else one :class:`~gali_ext.errors.ConfigError` naming ``option``,
    the path and why. Creates nothing that stays; call it before any work.

    Args:
        path: the path as the user gave it (a ``str``: ``""`` is refused, where ``Path("")``
            would be the current folder).
        option: how the message names the path (``--out``, ``--data-dir``, ``the export
            folder``).
        kind: one of :data:`OUTPUT_KINDS`.
        run: the run directory the command itself trains into: its own folders (its tracker
            folder ``logs/``) may be written.
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"kind must be one of {OUTPUT_KINDS}, got {kind!r}")
    text = os.fspath(path)
    if not text.strip():
        raise ConfigError(_empty(option, kind))
    out = Path(text)
    try:
        info = os.lstat(out)
    except FileNotFoundError:
        info = None
    except OSError as error:  # a parent that is a file, a name too long, a loop of links
        raise _unusable(option, text, error) from None
    if info is not None and stat.S_ISLNK(info.st_mode):
        real = os.path.realpath(out)
        again = f"{option} {real!r}" if option.startswith("-") else f"{real!r} itself"
        raise ConfigError(
            f"{option} {text!r} is a symbolic link to {real!r}: gali-ext writes nothing "
            f"through a link; pass {again} if that is where it should go"
        )
    if info is not None:
        folder = stat.S_ISDIR(info.st_mode)
        if kind == "file" and folder:
            raise ConfigError(
                f"{option} {text!r} is a folder: expected a file to write (a new one or one "
                f"to replace); name a file inside it, e.g. {str(out / 'results.json')!r}"
            )
        if kind != "file" and not folder:
            new = " (a new or empty one)" if kind == "new folder" else ""
            raise ConfigError(
                f"{option} {text!r} is a file: expected a folder{new}; {_another(option)}"
            )
        entries = sorted(os.listdir(out)) if kind == "new folder" else []
        if entries:
            raise ConfigError(
                f"{option} {text!r} exists and is not empty ({len(entries)} entries, e.g. "
                f"{entries[0]!r}): expected a new or empty folder; gali-ext never writes over "
                f"one: {_another(option)}"
            )
    owner = owning_run(out)
    if owner is not None and not (run is not None and _same(owner[0], run)):
        directory, entry = owner
        kind_of = "folder" if entry in RUN_FOLDERS else "file"
        exact = os.path.realpath(out) == os.path.realpath(directory / entry)
        place = "is" if exact else "lies in"
        raise ConfigError(
            f"{option} {text!r} {place} {entry!r}, a {kind_of} of the run directory "
            f"{str(directory)!r} that only the run itself writes: {_another(option)} outside "
            "the run's own files and folders"
        )
    _check_writable(out, _receiving_folder(out, kind, info is not None, option), option)
    return out


def _empty(option: str, kind: str) -> str:
    if option == "--out" and kind == "file":
        return "--out '' is empty: expected a file, e.g. --out bench.json"
    if option == "--out":
        return (
            "--out '' is empty: expected a folder, e.g. --out runs/x (use --out . to mean the "
            "current folder)"
        )
    noun = "a file" if kind == "file" else "a folder"
    return f"{option} '' is empty: expected {noun} (use . to mean the current folder)"


def _another(option: str) -> str:
    return f"choose another {option}" if option.startswith("-") else "choose another path"


def _reason(error: OSError) -> str:
    return os.strerror(error.errno).lower() if error.errno else str(error)


def _unusable(option: str, text: str, error: OSError) -> ConfigError:
    """The error for a path that cannot even be looked at."""
    if error.errno in (errno.EACCES, errno.EPERM):
        return ConfigError(
            f"cannot write {option} {text!r} ({_reason(error)}): {_another(option)} in a "
            "folder you may write to"
        )
    return ConfigError(
        f"cannot write {option} {text!r} ({_reason(error)}): expected a path whose parents "
        f"are folders; {_another(option)}"
    )


def _same(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _receiving_folder(out: Path, kind: str, exists: bool, option: str) -> Path:
    """The folder that gets a new entry when ``out`` is written: ``out`` itself for a folder
    that exists, else the folder ``out`` (or its first missing parent) is created in."""
    if kind == "folder" and exists:
        return out
    absolute = Path(os.path.abspath(out))
    if kind == "file":
        parent = absolute.parent
        if not parent.is_dir():
            raise ConfigError(
                f"{option} {str(out)!r}: its folder {str(parent)!r} does not exist: create it "
                f"first, or {_another(option)}"
            )
        return parent
    for parent in absolute.parents:
        if parent.exists():
            if not parent.is_dir():
                raise _unusable(option, str(out), OSError(errno.ENOTDIR, "not a directory"))
            return parent
    return Path(absolute.anchor)


def _check_writable(out: Path, folder: Path, option: str) -> None:
    """Refuse ``out`` when ``folder``, where it is created or written, takes no new entry."""
    error = _probe(folder)
    if error is not None:
        where = "" if folder == Path(os.path.abspath(out)) else f" in {str(folder)!r}"
        raise ConfigError(
            f"cannot write {option} {str(out)!r}: nothing can be created{where} "
            f"({_reason(error)}); {_another(option)} in a folder you may write to"
        )


def _probe(folder: Path) -> OSError | None:
    """None when ``folder`` takes a new entry, else the error creating one gave; whatever the
    probe creates is gone when it returns (an unnamed file never has a name at all)."""
    unnamed = getattr(os, "O_TMPFILE", 0)
    if unnamed:
        try:
            os.close(os.open(folder, unnamed | os.O_WRONLY, 0o600))
            return None
        except OSError as error:
            if error.errno not in _NO_UNNAMED_FILES:
                return error
    try:
        made = tempfile.mkdtemp(prefix=".gali-ext-write-test-", dir=folder)
    except OSError as error:
        return error
    os.rmdir(made)
    return None
