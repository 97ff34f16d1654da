"""How a run starts (docs/design.md, section 10): the run directory checked, and the plan (start
fresh, replace it, or resume from a checkpoint) decided once, before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list
from torch import nn

from gali_ext.errors import CheckpointError, ConfigError, GaliError
from gali_ext.recipes.build import BuiltRun, launch_info
from gali_ext.recipes.checkpoints import (
    CHECKPOINTS_NAME,
    MANIFEST_NAME,
    adopt_checkpoint,
    checkpoint_number,
    list_checkpoints,
    load_torch_file,
    load_train_state_json,
    newest_intact_checkpoint,
    set_aside_checkpoint,
    verify_checkpoint,
    weights_mismatch,
)
from gali_ext.recipes.files import (
    RunDirectoryWarning,
    read_metrics,
    truncate_metrics,
    write_text_atomic,
)
from gali_ext.recipes.outputs import check_output_path
from gali_ext.recipes.plugins import imports_record
from gali_ext.recipes.rundir import (
    CONFIG_NAME,
    METRICS_NAME,
    check_no_links,
    check_overwrite,
    clear_run_directory,
    foreign_checkpoint_entries,
    is_run_directory,
    visible_entries,
)
from gali_ext.recipes.runs import resume_checkpoint
from gali_ext.recipes.settings import RecipeConfig

__all__ = [
    "RESUME_APPLIED",
    "ResumeDecision",
    "StartPlan",
    "apply_optimizer_settings",
    "check_resume_overrides",
    "check_run_dir",
    "decided_on_main",
    "fitting_checkpoint",
    "model_mismatch",
    "optimizer_mismatch",
    "plan_start",
    "resume_decision",
    "start_run",
]


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
    if not visible_entries(out):
        return ResumeDecision("fresh", reason=f"{str(out)!r} is empty")
    _check_holds_a_run(out)
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


def _check_holds_a_run(out: Path) -> None:
    """Refuse to resume into a folder that holds files but no run (a user's project)."""
    entries = visible_entries(out) if out.is_dir() else []
    if entries and not is_run_directory(out):
        names = ", ".join(sorted(e.name for e in entries)[:5])
        raise ConfigError(
            f"--resume: {str(out)!r} holds no run (no gali-ext config.json or checkpoint "
            f"manifest; it holds {names}): nothing was touched; choose another --out"
        )


RESUME_APPLIED = frozenset(
    {
        "steps",
        "epochs",
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
        "eval_every",
        "fid_weights",
    }
)
"""Settings a resume may change: each takes effect from the resumed step on (``epochs``
through the ``steps`` it resolves to; ``lr`` and ``betas`` through
:func:`apply_optimizer_settings`; ``num_workers`` and ``log_with`` change
how data is read and where metrics go, not what is trained; ``eval_every`` and
``fid_weights`` how often and what is evaluated). Every other setting is fixed by the checkpoint
(model, data, batch, objective, optimizer, precision, seed, ``ema_decay``; ``best_metric`` and
``eval_split``, by which ``best/`` was kept);
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


def check_run_dir(out: Path, config: RecipeConfig, resume: bool, overwrite: bool) -> bool:
    """Refuse to mix runs: an existing run directory is resumed, overwritten, or left alone.

    Read-only; called before the lock is taken and again under it. Returns whether ``out``
    holds something to replace (the caller empties it once everything else has been validated,
    so a failed start never destroys the previous run). ``--overwrite`` empties run
    directories only, never through a symbolic link (:func:`.rundir.check_overwrite`).
    """
    saved = out / CONFIG_NAME
    check_no_links(out)
    if config.log_with:
        check_output_path(out / "logs", "the tracker folder of --log-with", run=out)
    if resume:
        _check_holds_a_run(out)
        if out.is_dir() and saved.is_file():
            previous = RecipeConfig.from_json(saved)
            if previous.name != config.name:
                raise ConfigError(
                    f"--resume: {str(out)!r} holds a run of {previous.name!r}, not {config.name!r}"
                )
        return False
    if overwrite:
        return check_overwrite(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{str(out)!r} is a file, not a run directory")
    if out.is_dir() and visible_entries(out):
        what = "a run" if saved.is_file() else "files"
        raise ConfigError(
            f"{str(out)!r} already holds {what}; pass --resume to continue it or "
            "--overwrite to replace it"
        )
    return False


def _saved_world_size(out: Path) -> int | None:
    """The processes that trained the run in ``out`` (``config.json``'s "launch"), if recorded."""
    try:
        return int(json.loads((out / CONFIG_NAME).read_text())["launch"]["world_size"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


@dataclass(frozen=True)
class StartPlan:
    """How a run starts (:func:`plan_start`): ``replace`` the directory's contents first, and
    ``decision`` (``--resume`` only): continue from a checkpoint or start fresh."""

    replace: bool
    decision: ResumeDecision | None


def plan_start(
    out: Path,
    config: RecipeConfig,
    resume: bool,
    overwrite: bool,
    num_processes: int,
    trust_checkpoint: bool = False,
) -> StartPlan:
    """Decide, holding the run's lock, how the run starts; reads and writes nothing else (but
    the manifest of a checkpoint adopted with ``trust_checkpoint``).

    Without ``--resume``: :func:`check_run_dir`. With it: :func:`.rundir.resume_decision`
    (continue from the newest intact checkpoint, or start fresh a run stopped before its first
    checkpoint, or a clear error; ``trust_checkpoint`` adopts a checkpoint of gali-ext 0.1.0),
    the processes of the saved run, ``steps`` not below the checkpoint's step, and the settings
    a resume may change (:func:`.rundir.check_resume_overrides`).
    """
    replace = check_run_dir(out, config, resume, overwrite)
    if not resume:
        return StartPlan(replace, None)
    world = _saved_world_size(out) if out.is_dir() else None
    if world is not None and world != num_processes and list_checkpoints(out / CHECKPOINTS_NAME):
        raise ConfigError(
            f"--resume: {str(out)!r} was trained by {world} process(es), this launch has "
            f"{num_processes}; resume it with {world} so that each process reads the same "
            "shard of the data"
        )
    decision = resume_decision(out, num_processes, trust=trust_checkpoint)
    if decision.action == "continue":
        check_resume_overrides(RecipeConfig.from_json(out / CONFIG_NAME), config)
        step = load_train_state_json(decision.checkpoint)["step"]
        if config.steps < step:
            raise ConfigError(
                f"--resume --steps {config.steps}: {str(out)!r} is already at step {step} "
                f"({decision.checkpoint.name}); expected --steps {step} or more (config.json "
                "is left as it was)"
            )
    return StartPlan(
        decision.action == "fresh" and out.is_dir() and bool(visible_entries(out)), decision
    )


def decided_on_main(accelerator: Any, make: Any) -> Any:
    """``make()`` on the main process, its result (or the :class:`GaliError` it raised) given
    to every process, so that all of them go on or all stop."""
    result: list[Any] = [None, None]
    if accelerator.is_main_process:
        try:
            result[0] = make()
        except GaliError as error:
            result[1] = error
    if accelerator.num_processes > 1:
        result = broadcast_object_list(result)
    if result[1] is not None:
        raise result[1]
    return result[0]


def start_run(accelerator: Any, out: Path, plan: StartPlan, run: BuiltRun) -> int:
    """Carry out ``plan`` for the built ``run``; returns the step to start from (a
    checkpoint's on resume). Everything was validated and built before: a checkpoint of
    another architecture than the run's objective is passed over for an older one
    (:func:`fitting_checkpoint`), the main process empties a replaced run, sets the skipped
    checkpoints aside (with a warning each), the checkpoint is loaded (with the EMA) and changed
    ``lr``/``betas`` are put into the optimizers (and printed), and only then ``config.json`` is
    written (atomically) and the metrics logged after the checkpoint are dropped."""
    config, ema, optimizers, model = run.config, run.ema, run.optimizers, run.built.gali
    decision = plan.decision
    if decision is not None and decision.action == "continue":
        decision = fitting_checkpoint(
            decision, model, out, accelerator.num_processes, optimizers=optimizers
        )
    if accelerator.is_main_process:
        if plan.replace:
            kept = clear_run_directory(out)
            if kept:
                names = ", ".join(kept)
                warnings.warn(
                    f"kept {names} in {out}: gali-ext did not write them, so it "
                    "deletes none of them",
                    RunDirectoryWarning,
                    stacklevel=2,
                )
        foreign = foreign_checkpoint_entries(out)
        if foreign:
            warnings.warn(
                f"{out / CHECKPOINTS_NAME} holds {', '.join(foreign)}, which gali-ext "
                "did not write: left alone (rotation removes only its own "
                "checkpoint_N folders)",
                RunDirectoryWarning,
                stacklevel=2,
            )
        if decision is not None and decision.action == "continue":
            for checkpoint, reason in decision.skipped:
                moved = set_aside_checkpoint(checkpoint, out)
                warnings.warn(
                    f"--resume: skipped {checkpoint.name} ({reason}); moved it to {moved}",
                    RunDirectoryWarning,
                    stacklevel=2,
                )
        elif decision is not None:
            accelerator.print(f"--resume: starting {out} from step 0 ({decision.reason})")
    accelerator.wait_for_everyone()
    step = 0
    if decision is not None and decision.action == "continue":
        step = resume_checkpoint(accelerator, out, ema, decision.checkpoint)
        changes = []
        for optimizer in optimizers:
            changes += apply_optimizer_settings(optimizer, config.lr, config.betas)
        for change in sorted(set(changes)):
            accelerator.print(f"--resume: {change} from step {step} on")
    if accelerator.is_main_process:
        launch = {**launch_info(accelerator), **imports_record(config.spec)}
        write_text_atomic(out / CONFIG_NAME, config.to_json(launch) + "\n")
        truncate_metrics(out / METRICS_NAME, step)  # steps after the checkpoint are trained again
    accelerator.wait_for_everyone()
    return step


def model_mismatch(checkpoint: Path, model: nn.Module) -> str | None:
    """How the model saved in ``checkpoint`` (Accelerate's ``model.safetensors``) differs from
    ``model``: the first key of another shape, or keys ``model`` does not have; None when it
    fits (a checkpoint of another architecture, say another ``latent_dim``, does not)."""

    path = checkpoint / "model.safetensors"
    if not path.is_file():
        return None  # older layouts (model.bin) are checked by accelerate's own loading
    return weights_mismatch(model, path, missing_ok=True)


def optimizer_mismatch(checkpoint: Path, optimizers: Sequence[Any]) -> str | None:
    """How the optimizer states saved in ``checkpoint`` (Accelerate's ``optimizer.bin``,
    ``optimizer_1.bin``, ... in the order the optimizers were prepared) differ from
    ``optimizers``: the first file with another number of parameter groups, of parameters in a
    group, or a state tensor (``exp_avg``, ``momentum_buffer``) of another shape than its
    parameter; None when they fit. Loading such a file (two optimizer files swapped under a
    forged manifest) would fail inside ``load_state_dict``, or train on wrong moments."""
    for i, optimizer in enumerate(optimizers):
        name = "optimizer.bin" if i == 0 else f"optimizer_{i}.bin"
        if not (checkpoint / name).is_file():
            return None  # another layout: Accelerate's own loading reports it
        try:
            saved = load_torch_file(checkpoint / name)
        except CheckpointError as error:
            return str(error)
        groups = saved.get("param_groups") if isinstance(saved, dict) else None
        state = saved.get("state") if isinstance(saved, dict) else None
        if not isinstance(groups, list) or not isinstance(state, dict):
            return f"{name} holds no optimizer state (param_groups and state)"
        live = optimizer.param_groups
        if len(groups) != len(live):
            return f"{name} holds {len(groups)} parameter group(s), optimizer {i} has {len(live)}"
        pairs = []
        for g, (group, own) in enumerate(zip(groups, live)):
            ids = group.get("params") if isinstance(group, dict) else None
            if not isinstance(ids, list) or len(ids) != len(own["params"]):
                count = len(ids) if isinstance(ids, list) else "no"
                return (
                    f"{name}: parameter group {g} holds {count} parameters, optimizer {i}'s "
                    f"holds {len(own['params'])}"
                )
            pairs += list(zip(ids, own["params"]))
        for index, parameter in pairs:
            entry = state.get(index, {})
            for key, value in entry.items() if isinstance(entry, dict) else ():
                if (
                    isinstance(value, torch.Tensor)
                    and value.dim() == parameter.dim() > 0
                    and value.shape != parameter.shape
                ):
                    return (
                        f"{name}: {key!r} of parameter {index} has shape {list(value.shape)}, "
                        f"the parameter {list(parameter.shape)}"
                    )
    return None


def fitting_checkpoint(
    decision: ResumeDecision,
    model: nn.Module,
    out: Path,
    num_processes: int = 1,
    optimizers: Sequence[Any] = (),
) -> ResumeDecision:
    """``decision`` with its checkpoint replaced by the newest intact one whose model fits
    ``model`` (:func:`model_mismatch`) and whose optimizer states fit ``optimizers``
    (:func:`optimizer_mismatch`), the newer ones added to ``skipped`` with the reason (the
    caller sets them aside). Reads only, the same on every process. Raises
    :class:`~gali_ext.errors.CheckpointError` when no checkpoint fits."""
    chosen = decision.checkpoint
    number = checkpoint_number(chosen)
    older = [c for c in list_checkpoints(out / CHECKPOINTS_NAME) if checkpoint_number(c) < number]
    skipped = list(decision.skipped)
    for candidate in [chosen, *reversed(older)]:
        if candidate != chosen:
            problems = verify_checkpoint(candidate, num_processes)
            if problems:
                skipped.append((candidate, "; ".join(problems)))
                continue
        mismatch = model_mismatch(candidate, model)
        if mismatch is not None:
            skipped.append((candidate, f"a model of another architecture: {mismatch}"))
            continue
        mismatch = optimizer_mismatch(candidate, optimizers)
        if mismatch is not None:
            skipped.append((candidate, f"optimizer states that do not fit the run: {mismatch}"))
            continue
        return dataclasses.replace(decision, checkpoint=candidate, skipped=tuple(skipped))
    why = "; ".join(f"{c.name}: {reason}" for c, reason in skipped)
    raise CheckpointError(
        f"--resume: no checkpoint in {str(out / CHECKPOINTS_NAME)!r} fits this run's model "
        f"and optimizers ({why}); resume with the settings the run was trained with, or pass "
        "--overwrite to start it over"
    )
