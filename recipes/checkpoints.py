"""Checkpoint folders a resume can trust (docs/design.md, section 10).

- **manifest** (:func:`write_manifest`, :func:`verify_checkpoint`,
  :func:`newest_intact_checkpoint`): sizes and SHA-256 of every file, written last, so a
  checkpoint is used only when complete and unchanged; a damaged one is set aside
  (:func:`set_aside_checkpoint`), never deleted; only gali-ext's own ``checkpoint_N`` folders
  rotate (:func:`rotate_checkpoints`);
- **safe loading** (:func:`load_torch_file`, :func:`load_checkpoint_files`,
  :func:`load_state_safely`, :func:`save_train_state_json`): nothing a resume reads is unpickled
  with arbitrary classes; a checkpoint of gali-ext 0.1.0 is adopted only on request
  (:func:`adopt_checkpoint`).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import pickle
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from gali_ext.errors import CheckpointError, ConfigError, GaliError, first_line
from gali_ext.recipes.files import (
    TEMPORARY_PATTERN,
    storage_errors,
    write_json_atomic,
)

__all__ = [
    "CHECKPOINTS_NAME",
    "DAMAGED_NAME",
    "MANIFEST_NAME",
    "TRAIN_STATE_NAME",
    "adopt_checkpoint",
    "checkpoint_number",
    "list_checkpoints",
    "load_checkpoint_files",
    "load_state_safely",
    "load_torch_file",
    "load_train_state_json",
    "newest_intact_checkpoint",
    "rotate_checkpoints",
    "save_train_state_json",
    "set_aside_checkpoint",
    "verify_checkpoint",
    "weights_mismatch",
    "write_manifest",
]


CHECKPOINTS_NAME = "checkpoints"


MANIFEST_NAME = "manifest.json"


TRAIN_STATE_NAME = "train_state.json"


DAMAGED_NAME = "damaged-checkpoints"


_CHECKPOINT_PATTERN = re.compile(r"^(?:step-|checkpoint_)(\d+)$")


_TORCH_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")


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
        if relative == MANIFEST_NAME or TEMPORARY_PATTERN.match(path.name):
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


def _safe_globals() -> list[Any]:
    """What Accelerate's ``random_states_N.pkl`` needs beyond tensors: numpy arrays (the
    Mersenne-Twister state) rebuilt from their bytes. No class that runs code."""

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
    4. ``accelerator.load_state(..., load_kwargs={"weights_only": True})`` (a state that does not
       fit the prepared objects is a :class:`~gali_ext.errors.CheckpointError`);
    5. checks that the torch generator state was restored (Accelerate only logs a failure).
    """

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
    try:
        accelerator.load_state(str(checkpoint), load_kwargs={"weights_only": True})
    except GaliError:
        raise
    except (ValueError, RuntimeError, KeyError) as error:  # a state that does not fit
        raise CheckpointError(
            f"checkpoint {str(checkpoint)!r} does not fit this run ({type(error).__name__}: "
            f"{first_line(error)}): resume with the settings it was trained with, or start "
            "over with --overwrite"
        ) from error
    if not torch.equal(torch.get_rng_state(), saved):
        raise CheckpointError(
            f"the random states of {str(checkpoint)!r} were not restored: resuming would not "
            "reproduce the run"
        )
    return load_train_state_json(checkpoint)


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


def weights_mismatch(module: Any, path: str | Path, missing_ok: bool = False) -> str | None:
    """How the safetensors file ``path`` differs from ``module``'s ``state_dict()``, read from
    the file's header alone (no tensor is loaded, so ``module`` may sit on the ``meta`` device:
    a configuration is checked against its weights before anything is allocated): the first key
    of another shape, a key ``module`` does not have or, unless ``missing_ok``, one it needs that
    the file lacks; None when the file fits."""
    path = Path(path)
    expected = {k: list(v.shape) for k, v in module.state_dict().items()}
    try:
        with safe_open(str(path), "pt") as f:
            saved = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as error:  # SafetensorError on a damaged file, OSError
        return f"{path.name} cannot be read ({first_line(error)})"
    for key, shape in saved.items():
        if key not in expected:
            return f"{path.name} holds {key!r}, which the model does not have"
        if shape != expected[key]:
            return f"{path.name}: {key!r} has shape {shape}, the model expects {expected[key]}"
    missing = [k for k in expected if k not in saved]
    if missing and not missing_ok:
        return f"{path.name} lacks {len(missing)} key(s) the model needs, e.g. {missing[:3]}"
    return None
