"""Issue 26 ("Reliability, round three") end to end, through `gali-ext` as the user meets it.

Like tests/test_reliability_cli.py, the command line runs in this process (``cli``: ``sys.argv``
and the CLI's ``main``) on copies of one tiny trained run (digits-ali, 4 steps of batch 16,
checkpoints at steps 2 and 4). Each test names the item of the issue it pins.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gali_ext.recipes import checkpoints, files
from tests._helpers import TINY_RUN, one_error, train_run
from tests._helpers import run_cli as cli

BASE = TINY_RUN


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (but the lock) and its bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def plant_project(folder: Path) -> dict[str, bytes]:
    """Item 1's project folder: ``train.py``, ``data/``, ``checkpoints/epoch=3.ckpt``."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "checkpoints").mkdir(exist_ok=True)
    (folder / "train.py").write_text("print('my project')\n")
    (folder / "data" / "digits.csv").write_text("1,2,3\n")
    (folder / "checkpoints" / "epoch=3.ckpt").write_bytes(b"my weights")
    return snapshot(folder)


def checkpoint(run: Path, number: int) -> Path:
    return run / "checkpoints" / f"checkpoint_{number}"


def checkpoint_steps(run: Path) -> dict[str, int]:
    return {
        c.name: json.loads((c / "train_state.json").read_text())["step"]
        for c in checkpoints.list_checkpoints(run / "checkpoints")
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """digits-ali trained 4 steps: checkpoint_0 (step 2) and checkpoint_1 (step 4)."""
    run = tmp_path_factory.mktemp("base") / "run"
    train_run(run, [*BASE, "--steps", "4"])
    assert checkpoint_steps(run) == {"checkpoint_0": 2, "checkpoint_1": 4}
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A copy of the trained run, for one test to change."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


# --- 1. nothing that is not a run is deleted ---------------------------------------------------


def test_resume_and_overwrite_refuse_a_project_folder_and_delete_nothing(tmp_path, capsys):
    project = tmp_path / "p"
    before = plant_project(project)
    code, _, err = cli(capsys, "recipe", *BASE, "--out", str(project), "--resume", "--steps", "2")
    assert "holds no run" in one_error(code, err)
    assert snapshot(project) == before
    code, _, err = cli(
        capsys, "recipe", *BASE, "--out", str(project), "--overwrite", "--steps", "2"
    )
    assert "is not a run directory" in one_error(code, err)
    assert snapshot(project) == before
    # a metrics.jsonl or a checkpoints/ folder alone is no marker of a run
    (project / "metrics.jsonl").write_text('{"step": 1}\n')
    before = snapshot(project)
    code, _, err = cli(capsys, "recipe", *BASE, "--out", str(project), "--resume", "--steps", "2")
    assert "holds no run" in one_error(code, err)
    assert snapshot(project) == before


def test_an_empty_out_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = plant_project(tmp_path)
    for command in (
        ["recipe", *BASE, "--steps", "2"],
        ["recipe", *BASE, "--resume", "--steps", "2"],
        ["recipe", *BASE, "--overwrite", "--steps", "2"],
        ["study", "--steps", "1", "--seeds", "1", "--recipes", "digits-ali", "--jobs", "1"],
        ["bench"],
        ["train-evaluator", "digits"],
    ):
        code, _, err = cli(capsys, *command, "--out", "")
        noun = "a file" if command == ["bench"] else "a folder"  # bench writes bench.json
        assert one_error(code, err).startswith(f"error: --out '' is empty: expected {noun}")
    assert snapshot(tmp_path) == before


def test_overwrite_and_fresh_resume_remove_only_what_gali_ext_wrote(run, capsys):
    (run / "notes.txt").write_text("my notes")
    (run / "data").mkdir()
    (run / "data" / "x.csv").write_text("1")
    (run / "grids" / "favourite.png").write_bytes(b"png")
    kept = r"kept data/, grids/favourite.png, notes.txt in .*: gali-ext did not write them"
    with pytest.warns(files.RunDirectoryWarning, match=kept):
        code, _, err = cli(
            capsys, "recipe", *BASE, "--out", str(run), "--overwrite", "--steps", "2"
        )
    assert code == 0, err
    assert (run / "notes.txt").read_text() == "my notes" and (run / "data" / "x.csv").is_file()
    assert (run / "grids" / "favourite.png").read_bytes() == b"png"
    assert checkpoint_steps(run) == {"checkpoint_0": 2}


def test_plant_the_project_next_to_every_command_that_can_delete(run, tmp_path, capsys, evaluator):
    projects = {}

    def plant(name: str) -> Path:
        folder = tmp_path / name
        projects[folder] = plant_project(folder)
        return folder

    def run_copy(name: str) -> Path:
        return Path(shutil.copytree(run, tmp_path / name))

    code, _, err = cli(
        capsys, "recipe", *BASE, "--out", str(plant("resume")), "--resume", "--steps", "2"
    )
    assert code == 2, err
    code, _, err = cli(
        capsys, "recipe", *BASE, "--out", str(plant("overwrite")), "--overwrite", "--steps", "2"
    )
    assert code == 2, err
    # study: the project sits where a run of the study goes
    study = tmp_path / "study"
    shutil.copytree(evaluator, study / "evaluator-digits")
    plant("study/digits-ali-seed0")
    code, _, err = cli(
        capsys,
        "study",
        "--out",
        str(study),
        "--steps",
        "2",
        "--seeds",
        "1",
        "--recipes",
        "digits-ali",
        "--jobs",
        "1",
        "--no-progress",
        "--svm-samples",
        "50",
        "--svm-draws",
        "1",
    )
    assert "is not a run directory" in one_error(code, err)
    # eval and sample write into a project folder beside its files, and delete none of them
    code, out, err = cli(
        capsys,
        "eval",
        str(run_copy("to-eval")),
        "--evaluator",
        str(evaluator),
        "--out",
        str(plant("eval-out")),
        "--svm-samples",
        "50",
        "--svm-draws",
        "1",
    )
    assert code == 0, err
    assert (tmp_path / "eval-out" / "eval.json").is_file()
    code, out, err = cli(
        capsys, "sample", str(run_copy("to-sample")), "--out", str(plant("sample-out"))
    )
    assert code == 0, err
    for folder, before in projects.items():
        after = snapshot(folder)
        assert {k: after.get(k) for k in before} == before, folder


# --- 2. links inside a run directory -----------------------------------------------------------


def test_a_symlinked_lock_does_not_truncate_its_target(run, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    (run / ".lock").unlink(missing_ok=True)
    (run / ".lock").symlink_to(notes)
    code, _, err = cli(capsys, "recipe", *BASE, "--out", str(run), "--resume", "--steps", "6")
    line = one_error(code, err)
    assert ".lock" in line and "is a symbolic link" in line
    assert notes.read_text() == "my notes\n"


@pytest.mark.parametrize("name", ["metrics.jsonl", "config.json", "checkpoints"])
def test_links_where_a_run_writes_are_refused(run, tmp_path, capsys, name):
    elsewhere = tmp_path / "elsewhere"
    shutil.move(run / name, elsewhere)
    (run / name).symlink_to(elsewhere)
    before = snapshot(elsewhere) if elsewhere.is_dir() else elsewhere.read_bytes()
    code, _, err = cli(capsys, "recipe", *BASE, "--out", str(run), "--resume", "--steps", "6")
    line = one_error(code, err)
    assert f"{name}' is a symbolic link" in line and "writes nothing through a link" in line
    assert (snapshot(elsewhere) if elsewhere.is_dir() else elsewhere.read_bytes()) == before


# --- 3. checkpoint rotation -------------------------------------------------------------------


def test_rotation_removes_only_gali_ext_checkpoints(run, capsys):
    root = run / "checkpoints"
    shutil.copytree(checkpoint(run, 0), root / "best_step2")
    (root / "NOTES.txt").write_text("best is step 2")
    (root / ".DS_Store").write_bytes(b"\0")
    foreign = r"holds .DS_Store, NOTES.txt, best_step2/, which gali-ext did not write: left alone"
    with pytest.warns(files.RunDirectoryWarning, match=foreign):
        code, out, err = cli(
            capsys,
            "recipe",
            *BASE,
            "--out",
            str(run),
            "--resume",
            "--steps",
            "10",
            "--set",
            "keep_checkpoints=2",
        )
    assert code == 0, err
    assert checkpoint_steps(run) == {"checkpoint_3": 8, "checkpoint_4": 10}
    # Accelerate's own rotation is off: no "[RANK 0] Deleting 1 checkpoints ..." on the console
    assert "Deleting" not in out + err
    assert (root / "NOTES.txt").read_text() == "best is step 2" and (root / ".DS_Store").is_file()
    assert (root / "best_step2" / "manifest.json").is_file()


# --- 4. a diverged state is never a checkpoint -------------------------------------------------


def test_divergence_never_saves_a_diverged_checkpoint(run, capsys):
    for attempt in range(3):  # each retry diverges again; the good checkpoints stay
        code, _, err = cli(
            capsys,
            "recipe",
            *BASE,
            "--out",
            str(run),
            "--resume",
            "--steps",
            "12",
            "--set",
            "lr=1e30",
            "--set",
            "keep_checkpoints=2",
        )
        line = one_error(code, err)
        assert (
            "the last good checkpoint is checkpoint_1 (step 4): continue from it with "
            f"--resume --out '{run}'" in line
        ), line
        assert checkpoint_steps(run) == {"checkpoint_0": 2, "checkpoint_1": 4}, attempt
        for folder in checkpoints.list_checkpoints(run / "checkpoints"):
            weights = load_file(str(folder / "model.safetensors"))
            assert max(float(v.abs().max()) for v in weights.values()) < 100
    code, _, err = cli(
        capsys, "recipe", *BASE, "--out", str(run), "--resume", "--steps", "6", "--set", "lr=2e-4"
    )
    assert code == 0, err
    assert checkpoint_steps(run)["checkpoint_2"] == 6


# --- 5. a run of the previous release resumes ----------------------------------------------------


def make_old_release_run(run: Path) -> None:
    """What gali-ext 0.1.0 left: ``step-NNNNNNN`` checkpoints without manifest.json and
    train_state.json, the loop's state in ``custom_checkpoint_0.pkl``."""
    for number, step in ((0, 2), (1, 4)):
        folder = checkpoint(run, number)
        (folder / "manifest.json").unlink()
        (folder / "train_state.json").unlink()
        torch.save({"step": step}, folder / "custom_checkpoint_0.pkl")
        folder.rename(run / "checkpoints" / f"step-{step:07d}")


def test_a_run_of_the_previous_release_resumes_with_trust_checkpoint(run, capsys):
    make_old_release_run(run)
    code, _, err = cli(capsys, "recipe", *BASE, "--out", str(run), "--resume", "--steps", "6")
    line = one_error(code, err)
    assert (
        "if step-0000004 was written by gali-ext 0.1.0 (no manifest), pass "
        "--trust-checkpoint to resume from it" in line
    ), line
    with pytest.warns(files.RunDirectoryWarning, match="--trust-checkpoint: step-0000004 had no"):
        code, out, err = cli(
            capsys,
            "recipe",
            *BASE,
            "--out",
            str(run),
            "--resume",
            "--steps",
            "6",
            "--trust-checkpoint",
        )
    assert code == 0, err
    assert "at step 4" in out
    state = json.loads((checkpoint(run, 5) / "train_state.json").read_text())
    assert state["step"] == 6
    code, _, err = cli(capsys, "recipe", *BASE, "--out", str(run), "--trust-checkpoint")
    assert (
        one_error(code, err) == "error: --trust-checkpoint goes with --resume (it adopts a "
        "run's checkpoint)"
    )


# --- 6. mismatches that trained on silently ------------------------------------------------------


def test_resume_as_another_recipe_is_an_error(run, capsys):
    before = snapshot(run)
    code, _, err = cli(
        capsys,
        "recipe",
        "digits-gali8",
        "--out",
        str(run),
        "--resume",
        "--steps",
        "6",
        "--no-progress",
    )
    line = one_error(code, err)
    assert "holds a run of 'digits-ali', not 'digits-gali8'" in line
    assert snapshot(run) == before


def test_resume_with_fewer_steps_than_the_checkpoint_is_an_error(run, capsys):
    config = (run / "config.json").read_text()
    code, _, err = cli(capsys, "recipe", *BASE, "--out", str(run), "--resume", "--steps", "3")
    line = one_error(code, err)
    assert (
        "--resume --steps 3: " in line
        and "is already at step 4 (checkpoint_1); expected --steps 4 or more" in line
    )
    assert (run / "config.json").read_text() == config


def test_a_forged_negative_step_is_refused(run, capsys):
    for number in (0, 1):
        folder = checkpoint(run, number)
        (folder / "train_state.json").write_text('{"step": -5, "world_size": 1}')
        checkpoints.write_manifest(folder)  # a manifest forged to match, without a step
    code, _, err = cli(capsys, "recipe", *BASE, "--out", str(run), "--resume", "--steps", "6")
    line = one_error(code, err)
    assert "expected a step that is an int >= 0, got -5" in line


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "a/b", ".."])
def test_a_name_that_is_a_path_is_refused(tmp_path, capsys, name):
    code, _, err = cli(
        capsys,
        "recipe",
        *BASE,
        "--out",
        str(tmp_path / "run"),
        "--steps",
        "2",
        "--set",
        f"name={name}",
        "--log-with",
        "tensorboard",
    )
    assert one_error(code, err).startswith(f"error: name={name!r} is invalid: expected a plain")
    assert not (tmp_path / "run").exists() and not (tmp_path.parent / "x").exists()


def test_train_evaluator_refuses_epochs_below_one(tmp_path, capsys):
    for epochs in ("-1", "0"):
        code, _, err = cli(
            capsys, "train-evaluator", "digits", "--out", str(tmp_path / "ev"), "--epochs", epochs
        )
        assert (
            one_error(code, err) == f"error: --epochs must be >= 1, got {epochs}: an "
            "untrained evaluator would score every run as chance"
        )
    assert not (tmp_path / "ev").exists()


def test_eval_refuses_to_mix_ema_and_trained_weights(run, tmp_path, capsys, evaluator):
    raw = Path(shutil.copytree(run, tmp_path / "raw"))
    for name in ("encoder_ema", "generator_ema"):
        (raw / f"{name}.safetensors").unlink()
    code, _, err = cli(
        capsys,
        "eval",
        str(run),
        str(raw),
        "--evaluator",
        str(evaluator),
        "--svm-samples",
        "50",
        "--svm-draws",
        "1",
    )
    line = one_error(code, err)
    assert (
        f"the runs of digits-ali would mix EMA weights ({run}) with trained weights ({raw})" in line
        and "pass --raw-weights" in line
    )
    assert not (run.parent / "eval.json").exists()


def test_study_refuses_to_reuse_runs_trained_with_other_settings(tmp_path, capsys, evaluator):
    study = tmp_path / "study"
    shutil.copytree(evaluator, study / "evaluator-digits")
    args = [
        "study",
        "--out",
        str(study),
        "--seeds",
        "1",
        "--recipes",
        "digits-ali",
        "--jobs",
        "1",
        "--no-progress",
        "--svm-samples",
        "50",
        "--svm-draws",
        "1",
        "--set",
        "batch_size=16",
    ]
    code, _, err = cli(capsys, *args, "--steps", "2")
    assert code == 0, err
    before = snapshot(study / "digits-ali-seed0")
    for changed in (["--steps", "3"], ["--steps", "2", "--set", "lr=1e-3"]):
        code, _, err = cli(capsys, *args, *changed)
        line = one_error(code, err)
        assert (
            "digits-ali-seed0' was trained with " in line
            and "a finished run is reused only with the same settings" in line
        ), line
    assert snapshot(study / "digits-ali-seed0") == before
    assert json.loads((study / "study.json").read_text())["settings"]["steps"] == 2


# --- 7. a checkpoint of another architecture ----------------------------------------------------


def test_a_checkpoint_of_another_architecture_falls_back_to_the_older_one(run, tmp_path, capsys):
    other = tmp_path / "other"
    code, _, err = cli(
        capsys, "recipe", *BASE, "--out", str(other), "--steps", "2", "--set", "latent_dim=8"
    )
    assert code == 0, err
    shutil.copytree(checkpoint(other, 0), checkpoint(run, 2))  # its own valid manifest, step 2
    with pytest.warns(
        files.RunDirectoryWarning,
        match=r"skipped checkpoint_2 \(a model of "
        r"another architecture: model.safetensors: .* has shape \[",
    ):
        code, out, err = cli(capsys, "recipe", *BASE, "--out", str(run), "--resume", "--steps", "6")
    assert code == 0, err
    assert "resumed from" in out and "checkpoint_1 at step 4" in out
    assert (run / "damaged-checkpoints" / "checkpoint_2").is_dir()
    # with no checkpoint that fits: one line, nothing moved
    only = tmp_path / "only"
    shutil.copytree(other, only)
    (only / "config.json").write_text((run / "config.json").read_text())
    code, _, err = cli(capsys, "recipe", *BASE, "--out", str(only), "--resume", "--steps", "6")
    line = one_error(code, err)
    assert "no checkpoint in" in line and "fits this run's model" in line


# --- 8. study workers end with the study ---------------------------------------------------------


def children(pid: int) -> list[int]:
    """The PIDs whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_kill_9_of_a_study_ends_its_workers(tmp_path, evaluator):
    study = tmp_path / "study"
    shutil.copytree(evaluator, study / "evaluator-digits")
    command = [
        sys.executable,
        "-m",
        "gali_ext.cli",
        "study",
        "--out",
        str(study),
        "--steps",
        "100000",
        "--seeds",
        "1",
        "--recipes",
        "digits-ali,digits-gali4",
        "--jobs",
        "2",
        "--threads",
        "1",
        "--no-progress",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, workers = time.monotonic() + 120, []
        while time.monotonic() < deadline:
            workers = [
                p
                for p in children(process.pid)
                if "spawn_main"
                in (Path("/proc") / str(p) / "cmdline").read_bytes().decode(errors="ignore")
            ]
            if len(workers) == 2:
                break
            time.sleep(0.5)
        assert len(workers) == 2, "the study did not start its two workers"
        time.sleep(2)  # the workers are training
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(alive(p) for p in workers):
            time.sleep(0.2)
        assert not any(alive(p) for p in workers), "workers outlived the killed study"
    finally:
        for pid in [process.pid, *workers]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- 9. no traceback left ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (
            "latent_dim=100000000000",
            "cannot build the models of digits-ali (latent_dim="
            "100000000000, batch_size=16): out of memory",
        ),
        (
            "conditions=5",
            "conditions=5 is invalid: the digits labels are the classes 0..9: "
            "expected conditions=10",
        ),
    ],
)
def test_settings_that_fail_inside_torch_are_one_line(tmp_path, capsys, setting, expected):
    code, _, err = cli(
        capsys, "recipe", *BASE, "--out", str(tmp_path / "run"), "--steps", "2", "--set", setting
    )
    assert one_error(code, err).startswith(f"error: {expected}")
    assert not (tmp_path / "run").exists()  # no config.json left behind


def test_a_tracker_folder_that_cannot_be_written_is_one_line(run, capsys):
    shutil.rmtree(run / "logs", ignore_errors=True)
    (run / "logs").write_text("not a folder")
    config = (run / "config.json").read_text()
    code, _, err = cli(
        capsys,
        "recipe",
        *BASE,
        "--out",
        str(run),
        "--resume",
        "--steps",
        "6",
        "--log-with",
        "tensorboard",
    )
    assert "the tracker folder" in one_error(code, err)
    assert (run / "config.json").read_text() == config


def test_bad_out_paths_are_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file" / "run", Path("/dev/null/run"), tmp_path / ("x" * 300)):
        code, _, err = cli(capsys, "recipe", *BASE, "--out", str(out), "--steps", "2")
        line = one_error(code, err)
        assert "choose another --out" in line or "is a file" in line, line


def test_eval_on_a_full_disk_leaves_the_previous_eval_json(run, capsys, evaluator, monkeypatch):
    import errno

    (run.parent / "eval.json").write_text('{"old": true}')

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    code, _, err = cli(
        capsys,
        "eval",
        str(run),
        "--evaluator",
        str(evaluator),
        "--svm-samples",
        "50",
        "--svm-draws",
        "1",
    )
    assert one_error(code, err).startswith("error: the disk is full: eval.json could not be")
    assert (run.parent / "eval.json").read_text() == '{"old": true}'
    assert [p.name for p in run.parent.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["bench", "--repeats", "0"], "--repeats must be an int >= 1, got 0"),
        (["bench", "--warmup", "-1"], "--warmup must be an int >= 0, got -1"),
        (["bench", "--batch", "1"], "--batch must be an int >= 2, got 1"),
        (["bench", "--graphs", "--seconds", "0"], "--seconds must be a positive finite number"),
        (["eval", "RUN", "--svm-samples", "0"], "--svm-samples must be >= 10"),
        (["eval", "RUN", "--svm-draws", "0"], "--svm-draws must be >= 1, got 0"),
        (["study", "--threads", "0"], "threads must be >= 1 (torch threads per run), got 0"),
        (["study", "--svm-samples", "5"], "--svm-samples must be >= 10"),
    ],
)
def test_out_of_range_options_are_one_line(run, tmp_path, capsys, command, expected):
    command = [str(run) if c == "RUN" else c for c in command]
    if command[0] in ("bench", "study"):
        command += ["--out", str(tmp_path / "out")]
    code, _, err = cli(capsys, *command)
    assert one_error(code, err).startswith(f"error: {expected}")
    assert not (tmp_path / "out").exists()


def test_weights_that_explode_while_finite_are_never_saved(run, capsys, monkeypatch):
    from gali_ext.recipes import build as build_module

    real = build_module.train_step

    def exploding(gali, *args, step, **kwargs):
        metrics = real(gali, *args, step=step, **kwargs)
        if step == 5:  # the step before the checkpoint of step 6: D's weights explode, finite
            with torch.no_grad():
                for parameter in gali.head.parameters():
                    parameter.mul_(1e30)
        return metrics

    monkeypatch.setattr(build_module, "train_step", exploding)
    code, _, err = cli(capsys, "recipe", *BASE, "--out", str(run), "--resume", "--steps", "6")
    line = one_error(code, err)
    assert "the state diverged by step 6 (discriminator holds values up to" in line, line
    assert (
        "it was not saved as a checkpoint; the last good checkpoint is checkpoint_1 (step 4)"
        in line
    )
    assert checkpoint_steps(run) == {"checkpoint_0": 2, "checkpoint_1": 4}
