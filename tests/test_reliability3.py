"""Issue 26 ("Reliability, round three") end to end, through `gali-ext` as the user meets it.

Like tests/test_reliability_cli.py, the command line runs in this process (``cli``: ``sys.argv``
and the CLI's ``main``) on copies of one tiny trained run (digits-ali, 4 steps of batch 16,
checkpoints at steps 2 and 4). Each test names the item of the issue it pins.
"""

import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
from safetensors.torch import load_file

from gali_ext.recipes import rundir
from gali_ext.recipes.cli import main

BASE = [
    "digits-ali",
    "--set",
    "batch_size=16",
    "--set",
    "checkpoint_every=2",
    "--set",
    "log_every=1",
    "--set",
    "sample_every=1000",
    "--no-progress",
]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``gali-ext ARGS`` in this process: (exit status, stdout, stderr)."""
    argv, format_warning = sys.argv, warnings.formatwarning
    capsys.readouterr()
    sys.argv = ["gali-ext", *args]
    try:
        main()
        code = 0
    except SystemExit as exit:
        code = exit.code or 0
    finally:
        sys.argv, warnings.formatwarning = argv, format_warning
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def one_error(code: int, err: str) -> str:
    """The single ``error:`` line of a failed command (exit 2, no traceback)."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = error_lines(err)
    assert len(lines) == 1, err
    return lines[0]


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
        for c in rundir.list_checkpoints(run / "checkpoints")
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """digits-ali trained 4 steps: checkpoint_0 (step 2) and checkpoint_1 (step 4)."""
    run = tmp_path_factory.mktemp("base") / "run"
    patch = pytest.MonkeyPatch()
    patch.setattr(sys, "argv", ["gali-ext", "recipe", *BASE, "--steps", "4", "--out", str(run)])
    try:
        main()
    except SystemExit as exit:
        assert not exit.code
    finally:
        patch.undo()
    assert checkpoint_steps(run) == {"checkpoint_0": 2, "checkpoint_1": 4}
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A copy of the trained run, for one test to change."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory) -> Path:
    """A 1-epoch digits evaluator (a real one takes 10 epochs)."""
    from gali_ext.recipes.evaluator import train_evaluator

    folder = tmp_path_factory.mktemp("evaluator") / "evaluator-digits"
    train_evaluator("digits", folder, epochs=1)
    return folder


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
        assert one_error(code, err).startswith("error: --out '' is empty: expected a folder")
    assert snapshot(tmp_path) == before


def test_overwrite_and_fresh_resume_remove_only_what_gali_ext_wrote(run, capsys):
    (run / "NOTES.md").write_text("my notes")
    (run / "data").mkdir()
    (run / "data" / "x.csv").write_text("1")
    (run / "grids" / "favourite.png").write_bytes(b"png")
    kept = r"kept NOTES.md, data/, grids/favourite.png in .*: gali-ext did not write them"
    with pytest.warns(rundir.RunDirectoryWarning, match=kept):
        code, _, err = cli(
            capsys, "recipe", *BASE, "--out", str(run), "--overwrite", "--steps", "2"
        )
    assert code == 0, err
    assert (run / "NOTES.md").read_text() == "my notes" and (run / "data" / "x.csv").is_file()
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
    with pytest.warns(rundir.RunDirectoryWarning, match=foreign):
        code, _, err = cli(
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
        for folder in rundir.list_checkpoints(run / "checkpoints"):
            weights = load_file(str(folder / "model.safetensors"))
            assert max(float(v.abs().max()) for v in weights.values()) < 100
    code, _, err = cli(
        capsys, "recipe", *BASE, "--out", str(run), "--resume", "--steps", "6", "--set", "lr=2e-4"
    )
    assert code == 0, err
    assert checkpoint_steps(run)["checkpoint_2"] == 6
