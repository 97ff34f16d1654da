"""What a run directory is, holds and owns (docs/design.md, section 10).

- **layout** (:data:`CONFIG_NAME`, :data:`METRICS_NAME`, :data:`RUN_FILES`, :data:`RUN_FOLDERS`):
  the files and folders gali-ext writes into a run;
- **overwrite guard** (:func:`is_run_directory`, :func:`check_overwrite`,
  :func:`clear_run_directory`): a folder counts as a run only with gali-ext's ``config.json`` or
  a checkpoint with its manifest; ``--overwrite`` empties run directories only, never through a
  symbolic link, and deletes only what gali-ext wrote;
- **leftovers** (:func:`remove_temporaries`, :func:`foreign_checkpoint_entries`): what a killed
  writer left is removed; what a user put into ``checkpoints/`` is left alone;
- **ownership** (:data:`RUN_ENTRIES`, :func:`owning_run`): the entries a run owns, which no other
  command writes into (:mod:`.outputs`).

The files themselves are written by :mod:`.files`, checkpoints checked by :mod:`.checkpoints`,
the directory locked by :mod:`.lock`; how a run starts in it is :mod:`.start`'s job.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from gali_ext.errors import ConfigError
from gali_ext.recipes.checkpoints import (
    CHECKPOINTS_NAME,
    DAMAGED_NAME,
    MANIFEST_NAME,
    checkpoint_number,
    list_checkpoints,
)
from gali_ext.recipes.files import (
    TEMPORARY_PATTERN,
    remove_path,
    storage_errors,
)
from gali_ext.recipes.lock import LOCK_NAME

__all__ = [
    "BEST_FILES",
    "BEST_NAME",
    "BEST_RECORD",
    "BEST_STAGING",
    "CONFIG_NAME",
    "METRICS_NAME",
    "RUN_FILES",
    "RUN_ENTRIES",
    "RUN_FOLDERS",
    "check_no_links",
    "check_overwrite",
    "clear_run_directory",
    "foreign_checkpoint_entries",
    "is_run_directory",
    "owning_run",
    "remove_temporaries",
    "visible_entries",
]

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"


def remove_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete what a killed writer left: ``.<name>.<pid>.tmp`` files in the run directory and
    its ``checkpoints/``, and ``checkpoints/.tmp-*`` folders. Returns what was removed."""
    run_dir = Path(run_dir)
    removed = []
    for folder in (run_dir, run_dir / CHECKPOINTS_NAME):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            temporary = TEMPORARY_PATTERN.match(entry.name) or (
                folder.name == CHECKPOINTS_NAME and entry.name.startswith(".tmp-")
            )
            if temporary:
                remove_path(entry)
                removed.append(entry)
    return removed


def visible_entries(folder: Path) -> list[Path]:
    """The entries of a folder other than the lock and temporaries of killed writers."""
    return [
        e for e in folder.iterdir() if e.name != LOCK_NAME and not TEMPORARY_PATTERN.match(e.name)
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
    "metrics.png",
    "encoder.safetensors",
    "generator.safetensors",
    "discriminator.safetensors",
    "encoder_ema.safetensors",
    "generator_ema.safetensors",
)
"""The files gali-ext writes at the top of a run directory (docs/design.md, section 10.1)."""
BEST_NAME = "best"
"""The folder of the best weights by ``best_metric`` (docs/design.md, section 10.1)."""
BEST_RECORD = "best.json"
BEST_FILES = (BEST_RECORD, "encoder.safetensors", "generator.safetensors")
"""What ``best/`` holds: the step and value (``best.json``) and the weights evaluated."""
BEST_STAGING = ("best.next", "best.old")
"""The next ``best/`` while it is written, and the previous one while it is replaced
(:func:`gali_ext.recipes.runs.save_best`); gali-ext's own, removed with the run."""
RUN_FOLDERS = (CHECKPOINTS_NAME, DAMAGED_NAME, "grids", "logs", BEST_NAME)
"""The folders gali-ext writes in a run directory; inside them it removes only its own
entries (:func:`clear_run_directory`)."""

RUN_ENTRIES = (LOCK_NAME, *RUN_FILES, *RUN_FOLDERS)
"""Every name a run directory owns: the lock, :data:`RUN_FILES` and :data:`RUN_FOLDERS`. A folder
added to the layout is added to :data:`RUN_FOLDERS`, and so becomes the run's own here."""


def owning_run(path: str | Path) -> tuple[Path, str] | None:
    """The run directory one of whose own entries (:data:`RUN_ENTRIES`) ``path`` is or lies in,
    and that entry's name; None when ``path`` is outside every run's own entries (the run
    directory itself is not one of its entries). ``path`` need not exist; it is read both as
    written (absolute) and with its links resolved, so a link does not hide a run's folder."""
    written = Path(os.path.abspath(path))
    for candidate in dict.fromkeys((written, Path(os.path.realpath(written)))):
        for entry in (candidate, *candidate.parents):
            if entry.name in RUN_ENTRIES and is_run_directory(entry.parent):
                return entry.parent, entry.name
    return None


_GRID_PATTERN = re.compile(r"^(?:samples|reconstructions)_step\d+\.png$")
_DAMAGED_PATTERN = re.compile(r"^(?:step-|checkpoint_)\d+(?:-\d+)?$")


def check_no_links(out: str | Path) -> None:
    """Refuse a run directory where a name gali-ext writes (``.lock``, ``config.json``,
    ``metrics.jsonl``, ``checkpoints/``, the weights, ...) is a symbolic link: writing or
    rotating through it would change files outside the run. Raises
    :class:`~gali_ext.errors.ConfigError` naming the link and its target."""
    out = Path(out)
    if not out.is_dir():
        return
    folders = (*RUN_FOLDERS, *BEST_STAGING)
    for name in (LOCK_NAME, *RUN_FILES, *folders):
        path = out / name
        if path.is_symlink():
            target = os.readlink(path)
            raise ConfigError(
                f"{str(path)!r} is a symbolic link (to {target!r}); gali-ext writes nothing "
                f"through a link inside a run directory: replace it by a plain "
                f"{'folder' if name in folders else 'file'} or remove it"
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
    entries = visible_entries(out)
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
        if entry.name in (*RUN_FILES, *BEST_STAGING) or TEMPORARY_PATTERN.match(entry.name):
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
        temporary = name.startswith(".tmp-") or TEMPORARY_PATTERN.match(name)
        return checkpoint_number(name) is not None or bool(temporary)
    if folder == DAMAGED_NAME:
        return bool(_DAMAGED_PATTERN.match(name))
    if folder == "grids":
        return bool(_GRID_PATTERN.match(name) or TEMPORARY_PATTERN.match(name))
    if folder == BEST_NAME:
        return name in BEST_FILES or bool(TEMPORARY_PATTERN.match(name))
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
            remove_path(entry)
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
        and not TEMPORARY_PATTERN.match(e.name)
    )
