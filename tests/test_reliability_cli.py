"""Issue 17 end to end, through `gali-ext recipe`: each case as the user meets it.

The command line runs in this process (``cli_train``: ``sys.argv`` and the CLI's ``main``), on
copies of one tiny trained run (digits-ali, 4 steps of batch 16, checkpoints at steps 2 and 4),
so the whole file takes seconds per case. A resumed run that ends at step 4 must equal that
run bit for bit: that is how "the same run" is checked.
"""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gali_ext.recipes import checkpoints, files
from tests._helpers import TINY_RUN, error_lines, run_cli, train_run

BASE = TINY_RUN
LOCK_HOLDER = """
import sys, time
from gali_ext.recipes.lock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def cli_train(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``gali-ext recipe ARGS`` in this process: (exit status, stdout, stderr)."""
    return run_cli(capsys, "recipe", *args)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (but the lock) and its bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def same_weights(run: Path, reference: Path) -> bool:
    for name in ("encoder", "generator", "discriminator"):
        a = load_file(str(run / f"{name}.safetensors"))
        b = load_file(str(reference / f"{name}.safetensors"))
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            return False
    return True


def logged_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """digits-ali trained 4 steps: checkpoint_0 (step 2) and checkpoint_1 (step 4)."""
    run = tmp_path_factory.mktemp("base") / "run"
    train_run(run, [*BASE, "--steps", "4"])
    assert logged_steps(run) == [1, 2, 3, 4]
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A copy of the trained run, for one test to damage."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def checkpoint(run: Path, number: int) -> Path:
    return run / "checkpoints" / f"checkpoint_{number}"


def rewrite_manifest(folder: Path) -> None:
    """What an attacker who can write the checkpoint also does: a manifest that matches."""
    checkpoints.write_manifest(folder, json.loads((folder / "manifest.json").read_text())["step"])


class Payload:
    """A pickle that creates a file when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --- 1. no code execution from a checkpoint ----------------------------------------------------


@pytest.mark.parametrize(
    "planted",
    [
        "model.safetensors",
        "optimizer.bin",
        "optimizer_1.bin",
        "random_states_0.pkl",
        "train_state.json",
        "custom_checkpoint_0.pkl",
    ],
)
def test_a_planted_pickle_in_any_checkpoint_file_never_runs(run, tmp_path, capsys, planted):
    marker = tmp_path / "pwned"
    newest = checkpoint(run, 1)
    if planted.endswith((".bin", ".pkl")):
        torch.save({"state": Payload(marker)}, newest / planted)
    else:
        (newest / planted).write_bytes(pickle.dumps(Payload(marker)))
    rewrite_manifest(newest)  # the manifest matches: only safe loading can stop it
    with pytest.warns(files.RunDirectoryWarning, match=r"skipped checkpoint_1 \(") as caught:
        code, out, err = cli_train(capsys, *BASE, "--steps", "2", "--out", str(run), "--resume")
    assert code == 0, err
    assert not marker.exists()
    assert "resumed from" in out and "checkpoint_0 at step 2" in out
    assert planted in str(caught[0].message)
    assert (run / "damaged-checkpoints" / "checkpoint_1" / planted).is_file()
    # the planted checkpoint holds the only copy: the resume stops, nothing runs
    oldest = checkpoint(run, 0)
    torch.save({"state": Payload(marker)}, oldest / "optimizer.bin")
    rewrite_manifest(oldest)
    code, out, err = cli_train(capsys, *BASE, "--steps", "2", "--out", str(run), "--resume")
    assert code == 2 and not marker.exists()
    (line,) = error_lines(err)
    assert "no intact checkpoint" in line and "refusing to load" in line and "posix.system" in line


# --- 2. no silent restart ----------------------------------------------------------------------


def test_resume_without_checkpoints_stops_and_overwrites_nothing(run, capsys):
    shutil.rmtree(run / "checkpoints")
    before = snapshot(run)
    code, out, err = cli_train(capsys, *BASE, "--steps", "6", "--out", str(run), "--resume")
    assert code == 2
    (line,) = error_lines(err)
    assert "holds a trained run" in line and "no checkpoint to continue from" in line
    assert snapshot(run) == before


def test_resume_of_a_run_that_never_reached_a_checkpoint_starts_fresh(tmp_path, capsys):
    run = tmp_path / "new"  # does not exist: --resume in a launcher script's first call
    code, out, err = cli_train(capsys, *BASE, "--steps", "1", "--out", str(run), "--resume")
    assert code == 0, err
    assert "starting" in out and "from step 0" in out
    assert logged_steps(run) == [1]
    # killed before its first checkpoint: config.json and metrics, no checkpoint
    shutil.rmtree(run / "checkpoints")
    for name in (
        "encoder",
        "generator",
        "discriminator",
        "encoder_ema",
        "generator_ema",
        "summary",
    ):
        next(run.glob(f"{name}.*")).unlink()
    code, out, err = cli_train(capsys, *BASE, "--steps", "1", "--out", str(run), "--resume")
    assert code == 0, err
    assert logged_steps(run) == [1]


# --- 3. atomic run files -----------------------------------------------------------------------


def test_a_half_written_metrics_line_is_dropped_with_a_warning(run, trained, capsys):
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "d_lo')  # kill -9 during an append
    with pytest.warns(files.RunDirectoryWarning, match="dropped a half-written last line"):
        code, out, err = cli_train(capsys, *BASE, "--steps", "4", "--out", str(run), "--resume")
    assert code == 0, err  # resumed at step 4: nothing to train, the metrics repaired
    assert logged_steps(run) == [1, 2, 3, 4]


KILLED_AT_CONFIG = """
import os, sys, time
from gali_ext.recipes.cli import main
real = os.replace
def hang(source, target):
    if str(target).endswith("config.json"):
        print("renaming", flush=True)
        time.sleep(120)
    return real(source, target)
os.replace = hang
sys.argv = ["gali-ext", "recipe", *sys.argv[1:]]
main()
"""


def test_kill_during_a_resumes_config_rewrite_leaves_the_old_config(run, capsys):
    before = (run / "config.json").read_text()
    args = [*BASE, "--steps", "5", "--out", str(run), "--resume", "--set", "lr=1e-3"]
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_AT_CONFIG, *args], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip().endswith("step 4")  # resumed from ...
        assert process.stdout.readline().strip().startswith("--resume: lr")
        assert process.stdout.readline().strip() == "renaming"
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
    assert (run / "config.json").read_text() == before
    code, out, err = cli_train(capsys, *args)
    assert code == 0, err
    assert json.loads((run / "config.json").read_text())["lr"] == 1e-3
    assert logged_steps(run) == [1, 2, 3, 4, 5]


# --- 4. one process per run directory ----------------------------------------------------------


def test_a_second_process_on_a_locked_run_stops_naming_the_holder(run, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(run)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run)
        for extra in (["--resume"], ["--overwrite"]):
            code, out, err = cli_train(capsys, *BASE, "--steps", "6", "--out", str(run), *extra)
            assert code == 2
            (line,) = error_lines(err)
            assert f"in use by another process (PID {holder.pid}," in line
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


# --- 5. a damaged newest checkpoint ------------------------------------------------------------


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(run, trained, capsys):
    damaged = checkpoint(run, 1) / "optimizer.bin"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    with pytest.warns(
        files.RunDirectoryWarning,
        match=r"skipped checkpoint_1 \(optimizer.bin "
        r"has 1000 bytes, the manifest says \d+\)",
    ):
        code, out, err = cli_train(capsys, *BASE, "--steps", "4", "--out", str(run), "--resume")
    assert code == 0, err
    assert "checkpoint_0 at step 2" in out
    assert same_weights(run, trained)  # steps 3 and 4 trained again, identically
    assert (run / "damaged-checkpoints" / "checkpoint_1").is_dir()


def test_missing_random_states_never_give_a_silently_different_run(run, trained, capsys):
    (checkpoint(run, 1) / "random_states_0.pkl").unlink()
    rewrite_manifest(checkpoint(run, 1))
    with pytest.warns(files.RunDirectoryWarning, match="random_states_0.pkl is missing"):
        code, out, err = cli_train(capsys, *BASE, "--steps", "4", "--out", str(run), "--resume")
    assert code == 0, err
    assert "checkpoint_0 at step 2" in out and same_weights(run, trained)
    # without any intact checkpoint: an error, not a run with other random numbers
    for folder in (run / "checkpoints").iterdir():
        (folder / "random_states_0.pkl").unlink()
    code, out, err = cli_train(capsys, *BASE, "--steps", "4", "--out", str(run), "--resume")
    assert code == 2
    (line,) = error_lines(err)
    assert "no intact checkpoint" in line and "random_states_0.pkl is missing" in line


# --- 6. settings on resume ---------------------------------------------------------------------


def test_a_changed_lr_on_resume_reaches_the_optimizers(run, capsys):
    code, out, err = cli_train(
        capsys, *BASE, "--steps", "5", "--out", str(run), "--resume", "--set", "lr=1e-3"
    )
    assert code == 0, err
    assert "--resume: lr 0.0002 -> 0.001 from step 4 on" in out
    newest = checkpoints.list_checkpoints(run / "checkpoints")[-1]
    assert json.loads((newest / "train_state.json").read_text())["step"] == 5
    for name in ("optimizer.bin", "optimizer_1.bin"):
        groups = checkpoints.load_torch_file(newest / name)["param_groups"]
        assert [g["lr"] for g in groups] == [1e-3] * len(groups)
    assert json.loads((run / "config.json").read_text())["lr"] == 1e-3


def test_a_refused_setting_on_resume_leaves_config_json_as_it_was(run, capsys):
    before = snapshot(run)
    code, out, err = cli_train(
        capsys, *BASE, "--steps", "6", "--out", str(run), "--resume", "--set", "batch_size=32"
    )
    assert code == 2
    (line,) = error_lines(err)
    assert "--resume cannot change batch_size (16 -> 32)" in line
    assert snapshot(run) == before
    code, out, err = cli_train(capsys, *BASE, "--steps", "4", "--out", str(run), "--resume")
    assert code == 0, err  # the next resume still works


# --- 7. --overwrite deletes run directories only -----------------------------------------------


def test_overwrite_refuses_a_folder_that_holds_no_run(tmp_path, capsys):
    paper = tmp_path / "paper"
    (paper / "data").mkdir(parents=True)
    (paper / "thesis.tex").write_text("\\chapter{GALI}")
    code, out, err = cli_train(capsys, *BASE, "--steps", "1", "--out", str(paper), "--overwrite")
    assert code == 2
    (line,) = error_lines(err)
    assert "is not a run directory" in line and "thesis.tex" in line
    assert sorted(p.name for p in paper.iterdir()) == ["data", "thesis.tex"]  # no .lock either


def test_overwrite_refuses_a_symlinked_out(run, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(run)
    before = snapshot(run)
    code, out, err = cli_train(capsys, *BASE, "--steps", "1", "--out", str(link), "--overwrite")
    assert code == 2
    (line,) = error_lines(err)
    assert "is a symbolic link to" in line and str(run) in line
    assert snapshot(run) == before


def test_overwrite_replaces_a_run(run, capsys):
    code, out, err = cli_train(capsys, *BASE, "--steps", "1", "--out", str(run), "--overwrite")
    assert code == 0, err
    assert logged_steps(run) == [1]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["checkpoint_0"]


# --- 8. checkpoint names past 9,999,999 --------------------------------------------------------


def test_checkpoint_numbers_past_seven_digits_sort_numerically(run, capsys):
    checkpoint(run, 0).rename(checkpoint(run, 9_999_999))
    checkpoint(run, 1).rename(checkpoint(run, 10_000_000))
    code, out, err = cli_train(
        capsys, *BASE, "--steps", "5", "--out", str(run), "--resume", "--set", "keep_checkpoints=2"
    )
    assert code == 0, err
    assert "checkpoint_10000000 at step 4" in out
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["checkpoint_10000000", "checkpoint_10000001"]  # the oldest went
    assert json.loads((checkpoint(run, 10_000_001) / "train_state.json").read_text())["step"] == 5


# --- 9. a full disk during a checkpoint --------------------------------------------------------


def test_a_full_disk_during_a_checkpoint_is_one_error_and_the_run_resumes(
    trained, tmp_path, capsys, monkeypatch
):
    real, calls = torch.save, {"n": 0}

    def full_disk(*args, **kwargs):  # the second checkpoint's first torch file
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    run = tmp_path / "run"
    monkeypatch.setattr(torch, "save", full_disk)
    code, out, err = cli_train(capsys, *BASE, "--steps", "4", "--out", str(run))
    assert code == 2 and "Traceback" not in err
    (line,) = error_lines(err)
    assert line.startswith("error: the disk is full: checkpoint checkpoint_1 could not be")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["checkpoint_0"]
    assert checkpoints.verify_checkpoint(checkpoint(run, 0)) == []
    monkeypatch.setattr(torch, "save", real)  # space freed
    code, out, err = cli_train(capsys, *BASE, "--steps", "4", "--out", str(run), "--resume")
    assert code == 0, err
    assert "checkpoint_0 at step 2" in out
    assert same_weights(run, trained) and logged_steps(run) == [1, 2, 3, 4]
