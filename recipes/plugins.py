"""A user's own presets and providers on the command line: ``gali-ext --import MODULE`` and the
entry-point group ``gali_ext.presets`` of installed packages (README, "Write a feedback
provider").

A run records in its ``config.json`` (under ``"launch"``) the modules ``--import`` imported and
where its preset was registered (:func:`imports_record`). A resume does not import them by
itself, since nothing a resume reads may run code (docs/design.md, section 10.6): when the
preset is missing it says in one line which module to import (:func:`check_run_preset`). An
installed package's presets load without any import.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from gali_ext.errors import ConfigError, GaliError, first_line
from gali_ext.presets import ENTRY_POINT_GROUP, available_presets, get_preset

__all__ = [
    "check_run_preset",
    "import_module",
    "import_modules",
    "imported_modules",
    "imports_record",
]

_IMPORTED: list[str] = []  # what --import imported in this process, in order


def _where(error: BaseException, name: str) -> str:
    """`` (file:line)`` where the module ``name`` raised ``error``: its innermost frame in the
    module's own file, else outside the import machinery."""
    if isinstance(error, SyntaxError) and error.filename:
        return f" ({error.filename}:{error.lineno})"
    try:  # the module left sys.modules when it raised; its spec still names its file
        origin = getattr(importlib.util.find_spec(name), "origin", None)
    except (ImportError, ValueError):
        origin = None
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "importlib" not in f.filename]
    own = [f for f in frames if f.filename == origin]
    frames = own or frames
    return f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def import_module(name: str, option: str = "--import") -> ModuleType:
    """Import the module ``name`` (a dotted name, looked up in the current folder first, then
    the path), for ``option`` (the words an error starts with).

    Every failure is one :class:`~gali_ext.errors.ConfigError` naming the module and the fix:
    a file path or a relative name instead of a module name, a module not found, a module that
    imports one that is missing, and a module that raises while it is imported (with the file
    and line).
    """
    text = name.strip() if isinstance(name, str) else ""
    path_like = "/" in text or "\\" in text or text.endswith(".py") or text.startswith(".")
    if path_like or not all(part.isidentifier() for part in text.split(".")):
        hint = ""
        if path_like:
            hint = (
                ", not a file path or a relative name: for a file DIR/NAME.py, run from DIR (or "
                f"add DIR to PYTHONPATH) and pass {option} NAME"
            )
        raise ConfigError(
            f"{option} {name!r}: expected a module name as in an import statement, such as "
            f"my_presets or my_project.gali{hint}"
        )
    if "" not in sys.path:
        sys.path.insert(0, "")  # modules in the current folder, as `python -m` would find them
    try:
        module = importlib.import_module(text)
    except ModuleNotFoundError as error:
        missing = error.name or text
        if text == missing or text.startswith(missing + "."):
            raise ConfigError(
                f"{option} {text}: no module named {missing!r} in the current folder, on "
                f"PYTHONPATH or among the installed packages: put {missing}.py in the current "
                "folder, add its folder to PYTHONPATH, or pip install its package"
            ) from None
        raise ConfigError(
            f"{option} {text}: the module imports {missing!r}, which is not installed"
            f"{_where(error, text)}: pip install it"
        ) from None
    except GaliError as error:
        raise ConfigError(
            f"{option} {text}: the module raised {type(error).__name__} while it was imported"
            f"{_where(error, text)}: {first_line(error)}"
        ) from None
    except Exception as error:  # any error of the user's module, reported in one line
        message = error.msg if isinstance(error, SyntaxError) else first_line(error)
        raise ConfigError(
            f"{option} {text}: the module raised {type(error).__name__} while it was imported"
            f"{_where(error, text)}: {message}; fix the module"
        ) from None
    if text not in _IMPORTED:
        _IMPORTED.append(text)
    return module


def import_modules(names: list[str] | tuple[str, ...]) -> None:
    """:func:`import_module` of each name, in order (the study's worker processes import what
    the study's own process imported)."""
    for name in names:
        import_module(name)


def imported_modules() -> list[str]:
    """The modules ``--import`` imported in this process, in order."""
    return list(_IMPORTED)


def imports_record(spec: str) -> dict[str, Any]:
    """What a run records of its imports (``config.json``, under ``"launch"``): ``imports``, the
    modules of ``--import``, and ``preset_source``, where its preset ``spec`` was registered
    (:attr:`~gali_ext.presets.Preset.source`)."""
    source = get_preset(spec).source if spec in available_presets() else ""
    return {"imports": imported_modules(), "preset_source": source}


def check_run_preset(run_dir: str | Path, spec: str, command: str = "...") -> None:
    """Raise one :class:`~gali_ext.errors.ConfigError` when the run in ``run_dir`` was trained
    with a preset ``spec`` that is not registered in this process, saying which module to
    import (from the run's record) or which package to install; ``command`` is the rest of
    the ``gali-ext`` command line it suggests."""
    if spec in available_presets():
        return
    launch: dict[str, Any] = {}
    try:
        launch = json.loads((Path(run_dir) / "config.json").read_text()).get("launch") or {}
    except (OSError, ValueError, AttributeError):
        pass
    imports = [m for m in launch.get("imports") or [] if isinstance(m, str)]
    source = launch.get("preset_source")
    source = source if isinstance(source, str) else ""
    command = "gali-ext " + "".join(f"--import {m} " for m in imports or [source]) + command
    if source.startswith("entry point"):
        why = (
            f"registered by the installed package's {source} (group {ENTRY_POINT_GROUP}), "
            "which is not installed here: install that package again"
        )
    elif source and source != "__main__":
        why = f"registered by the module {source}: import it, `{command}`"
    elif source == "__main__":
        why = (
            "registered by the script that trained it: register it again (import the code "
            "that calls register_preset) before resuming"
        )
    else:
        why = "which this process has not registered: import the module that registers it"
    raise ConfigError(f"{str(run_dir)!r} was trained with the preset {spec!r}, {why}")
