"""Issue 17, unit by unit: atomic run files, the lock, the overwrite guard, checkpoint manifests,
loading that never runs code from a checkpoint, the resume policy, storage errors, and the
checks where bad values enter the core (logits, instance noise, dtypes, batches, optimizers)."""

import errno
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gali_ext import GALI, Chains, build_spec
from gali_ext.errors import CheckpointError, ConfigError, DivergenceError, ShapeError
from gali_ext.head import add_instance_noise
from gali_ext.losses import (
    discriminator_loss,
    minimax_loss,
    misclassification_loss,
    product_of_terms_loss,
)
from gali_ext.providers import ReconstructionChain
from gali_ext.providers.pretrained import load_safetensors_into
from gali_ext.recipes import checkpoints, files, rundir, start
from gali_ext.recipes import get as get_recipe
from gali_ext.recipes.lock import RunLock
from gali_ext.recipes.settings import RecipeConfig, check_epochs
from gali_ext.trainer import (
    UNSUPPORTED_OPTIMIZERS,
    available_optimizers,
    build_optimizer,
    instance_noise_std,
    train_step,
)
from tests._helpers import make_head, random_variables
from tests.test_gali import StochasticEncoder

DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


def child(code: str, *args: str) -> subprocess.Popen:
    """A Python process running ``code`` with ``args``; its stdout is a pipe."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, bufsize=1
    )


def wait_for(process: subprocess.Popen, word: str) -> None:
    line = process.stdout.readline()
    assert line.strip() == word, f"the child said {line!r}, exit {process.poll()}"


def kill(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stdout.close()


# ------------------------------------------------------------------------------- atomic files

KILLED_WRITER = """
import os, sys, time
from gali_ext.recipes import files
where = sys.argv[2]
real_write, real_replace = os.write, os.replace
def half_then_hang(fd, data):
    written = real_write(fd, bytes(data[: len(data) // 2]))
    print("writing", flush=True)
    time.sleep(120)
    return written
def hang(source, target):
    print("renaming", flush=True)
    time.sleep(120)
if where == "write":
    os.write = half_then_hang
else:
    os.replace = hang
files.write_text_atomic(sys.argv[1], "NEW" * 100000)
"""


@pytest.mark.parametrize("where,word", [("write", "writing"), ("replace", "renaming")])
def test_sigkill_during_an_atomic_write_leaves_the_old_content(tmp_path, where, word):
    target = tmp_path / "config.json"
    target.write_text('{"old": true}')
    process = child(KILLED_WRITER, str(target), where)
    wait_for(process, word)
    kill(process)
    assert target.read_text() == '{"old": true}'
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert [p.name for p in leftovers] == [f".config.json.{process.pid}.tmp"]
    assert 0 < leftovers[0].stat().st_size <= 300000
    assert rundir.remove_temporaries(tmp_path) == leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_atomic_writes_replace_the_file_and_leave_no_temporary(tmp_path):
    files.write_json_atomic(tmp_path / "a.json", {"b": 1, "a": [1.5, None]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": [1.5, None], "b": 1}
    files.write_text_atomic(tmp_path / "a.json", "x")
    assert (tmp_path / "a.json").read_text() == "x"
    weights = {"w": torch.arange(6.0).view(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    files.save_file_atomic(weights, tmp_path / "w.safetensors")
    loaded = load_file(str(tmp_path / "w.safetensors"))
    assert torch.equal(loaded["w"], weights["w"]) and torch.equal(loaded["b"], weights["b"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "w.safetensors"]


def test_atomic_output_renames_only_a_finished_file(tmp_path):
    from safetensors.torch import save_model

    target = tmp_path / "encoder.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with files.atomic_output(target) as temporary:
            temporary.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]
    module = nn.Linear(2, 3)
    with files.atomic_output(target) as temporary:
        assert temporary.parent == tmp_path and temporary.name.startswith(".encoder")
        save_model(module, str(temporary))
    assert torch.equal(load_file(str(target))["weight"], module.weight.detach())
    assert sorted(tmp_path.iterdir()) == [target]


def test_a_full_disk_during_an_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "generator.safetensors"
    save_file({"w": torch.ones(3)}, str(target))
    before = target.read_bytes()

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(CheckpointError, match="the disk is full.*generator.safetensors.*--resume"):
        files.save_file_atomic({"w": torch.zeros(3)}, target)
    with pytest.raises(CheckpointError, match="the disk is full"):
        files.write_text_atomic(tmp_path / "config.json", "{}")
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generator.safetensors"]


def test_storage_errors_map_full_disks_and_read_only_folders(tmp_path):
    from safetensors import SafetensorError

    # what safetensors and torch's zip writer raised on a full 1 MiB tmpfs
    for error in (
        SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        ),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
        OSError(errno.ENOSPC, "No space left on device"),
    ):
        with pytest.raises(CheckpointError, match="the disk is full: the optimizer state"):
            with files.storage_errors("the optimizer state", tmp_path / "optimizer.bin"):
                raise error
    for code in (errno.EROFS, errno.EACCES):
        with pytest.raises(ConfigError, match=r"cannot write config.json to .*writable --out"):
            with files.storage_errors("config.json", tmp_path / "config.json"):
                raise OSError(code, os.strerror(code))
    half = tmp_path / "checkpoints" / ".tmp-step-0000020"
    half.mkdir(parents=True)
    (half / "model.safetensors").write_bytes(b"half")
    with pytest.raises(CheckpointError, match="the disk is full: checkpoint step-0000020"):
        with files.storage_errors("checkpoint step-0000020", half, cleanup=half):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    assert not half.exists()  # the previous checkpoint stays the newest
    with pytest.raises(ValueError, match="unrelated"):  # other errors pass unchanged
        with files.storage_errors("x", tmp_path):
            raise ValueError("unrelated")


def test_a_read_only_folder_is_one_config_error(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(ConfigError, match="read-only file system.*writable --out"):
        files.write_text_atomic(tmp_path / "config.json", "{}")
    with pytest.raises(ConfigError, match="the run lock.*writable --out"):
        RunLock(tmp_path / "run").acquire()


def test_every_torch_load_in_the_package_is_weights_only():
    """Stricter than a text search: every call of ``torch.load`` passes ``weights_only=True``,
    and nothing calls ``pickle.load``/``loads`` or builds an ``Unpickler``."""
    import ast

    root = Path(__file__).resolve().parent.parent
    offenders, loads = [], 0
    for folder in ("gali_ext", "adapters", "recipes"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                    continue
                owner = ast.unparse(node.func.value)
                where = f"{path.relative_to(root)}:{node.lineno}"
                if node.func.attr in ("load", "loads", "Unpickler") and owner == "pickle":
                    offenders.append(where)
                if node.func.attr == "load" and owner in ("torch", "torch.serialization"):
                    loads += 1
                    safe = any(
                        k.arg == "weights_only"
                        and isinstance(k.value, ast.Constant)
                        and k.value.value is True
                        for k in node.keywords
                    )
                    if not safe:
                        offenders.append(where)
    assert offenders == [] and loads >= 1


# ------------------------------------------------------------------------------ metrics.jsonl


def test_a_half_written_last_metrics_line_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "d_loss": 1.5}\n{"step": 2, "d_loss": 1.25}\n{"step": 3, "d_lo')
    with pytest.warns(files.RunDirectoryWarning, match="half-written last line"):
        records = files.read_metrics(path)
    assert records == [{"step": 1, "d_loss": 1.5}, {"step": 2, "d_loss": 1.25}]
    with pytest.warns(files.RunDirectoryWarning, match="half-written last line"):
        files.append_metrics(path, {"step": 3, "d_loss": 1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r["step"] for r in files.read_metrics(path)] == [1, 2, 3]
    assert path.read_text().endswith('{"step": 3, "d_loss": 1.0}\n')
    assert files.read_metrics(tmp_path / "none.jsonl") == []


def test_a_damaged_line_inside_the_metrics_names_its_number(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(CheckpointError, match=r"metrics.jsonl', line 2: not a JSON record"):
        files.read_metrics(path)


def test_truncate_metrics_keeps_the_steps_of_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for step in range(1, 11):
        files.append_metrics(path, {"step": step, "g_loss": step / 4})
    assert files.truncate_metrics(path, 6) == 4
    assert [r["step"] for r in files.read_metrics(path)] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


# ------------------------------------------------------------------------------------ the lock

LOCK_HOLDER = """
import sys, time
from gali_ext.recipes.lock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_process_is_refused_with_the_holders_pid_until_it_dies(tmp_path):
    run = tmp_path / "run"
    holder = child(LOCK_HOLDER, str(run))
    try:
        wait_for(holder, "locked")
        with pytest.raises(ConfigError, match=rf"in use by another process \(PID {holder.pid},"):
            RunLock(run).acquire()
    finally:
        kill(holder)
    # kill -9 leaves the file but the kernel dropped the lock
    with RunLock(run) as lock:
        assert lock.held and (run / ".lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(ConfigError, match=f"PID {os.getpid()},"):
            RunLock(run).acquire()  # also a second lock in this process
    again = RunLock(run).acquire()
    assert again.held
    again.release()


LOCK_HOLDER_WITH_WORKER = """
import os, sys, time
from gali_ext.recipes.lock import RunLock
lock = RunLock(sys.argv[1]).acquire()
if os.fork() == 0:  # a DataLoader worker: it shares the lock and outlives its parent briefly
    time.sleep(1.5)
    os._exit(0)
print("locked", flush=True)
time.sleep(120)
"""


def test_a_killed_holders_forked_workers_are_waited_for(tmp_path):
    run = tmp_path / "run"
    holder = child(LOCK_HOLDER_WITH_WORKER, str(run))
    wait_for(holder, "locked")
    kill(holder)  # the worker still holds the lock for about a second
    lock = RunLock(run).acquire()  # waits for it, where it used to fail at once
    assert lock.held
    lock.release()


def test_a_lock_that_made_the_folder_removes_it_when_nothing_was_written(tmp_path):
    with RunLock(tmp_path / "new"):
        assert (tmp_path / "new" / ".lock").is_file()
    assert not (tmp_path / "new").exists()
    with RunLock(tmp_path / "used"):
        (tmp_path / "used" / "config.json").write_text("{}")
    assert (tmp_path / "used" / "config.json").is_file()


# ---------------------------------------------------------------------------- overwrite guard


def run_config_text() -> str:
    return get_recipe("digits-ali").to_json()


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    thesis = tmp_path / "thesis"
    (thesis / "data").mkdir(parents=True)
    (thesis / "thesis.tex").write_text("\\documentclass{article}")
    (thesis / "config.json").write_text('{"editor": "vim"}')  # a project's own config.json
    assert not rundir.is_run_directory(thesis)
    with pytest.raises(ConfigError, match=r"not a run directory .*config.json, data/, thesis.tex"):
        rundir.check_overwrite(thesis)
    assert (thesis / "thesis.tex").is_file()
    assert rundir.check_overwrite(tmp_path / "missing") is False
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".lock").write_text("")
    assert rundir.check_overwrite(tmp_path / "empty") is False


def test_overwrite_empties_a_run_but_keeps_the_lock(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-0000010").mkdir(parents=True)
    (run / "config.json").write_text(run_config_text())
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep.txt").write_text("x")
    (run / "link").symlink_to(tmp_path / "elsewhere")
    with RunLock(run):
        assert rundir.check_overwrite(run) is True
        assert rundir.clear_run_directory(run) == ["link"]  # not gali-ext's: kept, and named
        assert sorted(p.name for p in run.iterdir()) == [".lock", "link"]
    assert (tmp_path / "elsewhere" / "keep.txt").is_file()  # nothing is followed through a link
    for marker in ("metrics.jsonl", "config.json", "checkpoints/epoch=3.ckpt"):
        other = tmp_path / marker.replace("/", "-")
        (other / marker).parent.mkdir(parents=True)
        (other / marker).write_text("")  # none of these is a marker only gali-ext writes
        assert not rundir.is_run_directory(other)


def test_overwrite_refuses_a_symlinked_out_and_names_the_real_folder(tmp_path):
    real = tmp_path / "real-run"
    real.mkdir()
    (real / "config.json").write_text(run_config_text())
    (tmp_path / "out").symlink_to(real)
    with pytest.raises(ConfigError, match=rf"symbolic link to '{real}'.*--out '{real}'"):
        rundir.check_overwrite(tmp_path / "out")
    assert (real / "config.json").is_file()


# ------------------------------------------------------------------------------- checkpoints


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    accelerator = Accelerator(cpu=True)
    yield accelerator
    AcceleratorState._reset_state(reset_partial_state=True)


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.eg, self.d = nn.Linear(4, 3), nn.Linear(3, 2)


def prepared(accelerator):
    torch.manual_seed(0)
    model = Pair()
    d_opt = torch.optim.Adam(model.d.parameters(), lr=1e-3)
    g_opt = torch.optim.Adam(model.eg.parameters(), lr=1e-3)
    model, d_opt, g_opt = accelerator.prepare(model, d_opt, g_opt)
    model.d(model.eg(torch.randn(5, 4))).pow(2).mean().backward()
    d_opt.step()
    g_opt.step()
    return model, d_opt, g_opt


def save_checkpoint(accelerator, folder: Path, step: int) -> None:
    """What the loop does: Accelerate's state, the loop's state as JSON, the manifest last."""
    accelerator.save_state(str(folder))
    checkpoints.save_train_state_json(folder, {"step": step, "epoch": 0, "position": step})
    checkpoints.write_manifest(folder, step)


def test_checkpoint_names_sort_by_number_past_seven_digits(tmp_path):
    for name in (
        "step-10000000",
        "step-9999999",
        "step-0000100",
        ".tmp-step-20000000",
        "checkpoint_10",
        "checkpoint_2",
        "notes",
    ):
        (tmp_path / name).mkdir()
    names = [p.name for p in checkpoints.list_checkpoints(tmp_path)]
    assert names == [
        "checkpoint_2",
        "checkpoint_10",
        "step-0000100",
        "step-9999999",
        "step-10000000",
    ]
    assert sorted(["step-10000000", "step-9999999"])[-1] == "step-9999999"  # what a name sort did


def test_the_manifest_finds_every_kind_of_damage(tmp_path, accelerator):
    prepared(accelerator)
    folder = tmp_path / "step-0000005"
    save_checkpoint(accelerator, folder, 5)
    assert checkpoints.verify_checkpoint(folder) == []
    manifest = json.loads((folder / "manifest.json").read_text())
    names = sorted(manifest["files"])
    assert names == [
        "model.safetensors",
        "optimizer.bin",
        "optimizer_1.bin",
        "random_states_0.pkl",
        "train_state.json",
    ]
    entry = manifest["files"]["optimizer.bin"]
    assert entry["size"] == (folder / "optimizer.bin").stat().st_size

    def damaged(change) -> list[str]:
        copy = tmp_path / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(folder, copy)
        change(copy)
        return checkpoints.verify_checkpoint(copy)

    def truncate(c):
        data = (c / "model.safetensors").read_bytes()
        (c / "model.safetensors").write_bytes(data[:-10])

    def flip(c):
        data = bytearray((c / "optimizer.bin").read_bytes())
        data[-30] ^= 1
        (c / "optimizer.bin").write_bytes(bytes(data))

    size = (folder / "model.safetensors").stat().st_size
    assert damaged(truncate) == [
        f"model.safetensors has {size - 10} bytes, the manifest says {size}"
    ]
    assert damaged(flip) == ["optimizer.bin differs from the manifest (SHA-256)"]
    assert damaged(lambda c: (c / "random_states_0.pkl").unlink()) == [
        "random_states_0.pkl is missing"
    ]
    assert damaged(lambda c: (c / "custom_checkpoint_0.pkl").write_bytes(b"x")) == [
        "custom_checkpoint_0.pkl is not in the manifest"
    ]
    assert damaged(lambda c: (c / "manifest.json").unlink())[0].startswith("no manifest.json")
    assert damaged(lambda c: (c / "manifest.json").write_text("{"))[0].startswith(
        "manifest.json is damaged"
    )
    assert "random_states_1.pkl is missing from the checkpoint" in checkpoints.verify_checkpoint(
        folder, num_processes=2
    )


def test_the_newest_intact_checkpoint_is_chosen_and_the_skipped_ones_named(tmp_path, accelerator):
    prepared(accelerator)
    root = tmp_path / "checkpoints"
    for step in (9999999, 10000000, 10000001):
        save_checkpoint(accelerator, root / f"step-{step:07d}", step)
    (root / "step-10000001" / "model.safetensors").unlink()
    # damaged random states whose manifest was rewritten: only loading them finds it
    torch.save({"step": 3}, root / "step-10000000" / "random_states_0.pkl")
    checkpoints.write_manifest(root / "step-10000000", 10000000)
    best, skipped = checkpoints.newest_intact_checkpoint(root)
    assert best == root / "step-9999999"
    assert [(p.name, reason.split(":")[0]) for p, reason in skipped] == [
        ("step-10000001", "model.safetensors is missing"),
        (
            "step-10000000",
            f"'{root / 'step-10000000' / 'random_states_0.pkl'}' is missing or "
            "lacks the generator states random_state, numpy_random_seed, "
            "torch_manual_seed",
        ),
    ]
    moved = checkpoints.set_aside_checkpoint(root / "step-10000001", tmp_path)
    assert moved == tmp_path / "damaged-checkpoints" / "step-10000001" and moved.is_dir()


class Payload:
    """Unpickling it creates the file ``marker``: code run from a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_planted_pickles_never_run_through_the_safe_path(tmp_path, accelerator):
    prepared(accelerator)
    folder = tmp_path / "step-0000003"
    save_checkpoint(accelerator, folder, 3)
    marker = tmp_path / "pwned"
    targets = sorted(p.name for p in folder.iterdir()) + ["custom_checkpoint_0.pkl"]
    assert len(targets) == 7
    for target in targets:
        for fmt in ("torch", "raw"):
            planted = tmp_path / f"{target}-{fmt}" / "step-0000003"
            shutil.copytree(folder, planted)
            if fmt == "torch":
                torch.save({"state": Payload(marker)}, planted / target)
            else:
                (planted / target).write_bytes(pickle.dumps(Payload(marker), protocol=2))
            if target != "manifest.json":
                checkpoints.write_manifest(planted, 3)  # the attacker rewrites the manifest too
            with pytest.raises(CheckpointError) as caught:
                checkpoints.load_state_safely(accelerator, planted)
            assert not marker.exists(), (target, fmt)
            if target.endswith((".bin", ".pkl")):
                assert "refusing to load" in str(caught.value)
                assert fmt == "raw" or "(io.open)" in str(caught.value)
            best, skipped = checkpoints.newest_intact_checkpoint(planted.parent)
            assert best is None and [p for p, _ in skipped] == [planted]
            assert not marker.exists(), (target, fmt)

    # The same payload through Accelerate's own custom-state path runs (weights_only=False):
    # what the loop must never do.
    class State:
        def state_dict(self):
            return {"step": 0}

        def load_state_dict(self, state):
            pass

    accelerator.register_for_checkpointing(State())
    with pytest.raises(ConfigError, match="register_for_checkpointing"):
        checkpoints.load_state_safely(accelerator, folder)
    torch.save({"state": Payload(marker)}, folder / "custom_checkpoint_0.pkl")
    accelerator.load_state(str(folder))
    assert marker.exists()


def test_load_state_safely_restores_weights_optimizers_generators_and_the_loop_state(
    tmp_path, accelerator
):
    model, d_opt, g_opt = prepared(accelerator)
    torch.manual_seed(42)
    folder = tmp_path / "step-0000007"
    save_checkpoint(accelerator, folder, 7)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = d_opt.state_dict()["state"][0]["exp_avg"].clone()
    expected_draw = torch.rand(3)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    torch.manual_seed(1)
    state = checkpoints.load_state_safely(accelerator, folder)
    assert state == {"step": 7, "epoch": 0, "position": 7}
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert torch.equal(d_opt.state_dict()["state"][0]["exp_avg"], optimizer)
    assert torch.equal(torch.rand(3), expected_draw)  # the generator continues where it was


def test_damaged_random_states_are_refused_where_accelerate_only_logs(tmp_path, accelerator):
    prepared(accelerator)
    folder = tmp_path / "step-0000004"
    save_checkpoint(accelerator, folder, 4)
    (folder / "random_states_0.pkl").write_bytes(b"PK\x03\x04 damaged")
    checkpoints.write_manifest(folder, 4)
    accelerator.load_state(str(folder))  # Accelerate goes on with other random numbers
    with pytest.raises(CheckpointError, match="random_states_0.pkl' is damaged"):
        checkpoints.load_state_safely(accelerator, folder)


# ----------------------------------------------------------------------------- resume policy


def make_run(tmp_path: Path, name: str = "run", **files: str) -> Path:
    run = tmp_path / name
    run.mkdir()
    for filename, text in files.items():
        (run / filename.replace("_dot_", ".")).write_text(text)
    return run


def metrics(last: int) -> str:
    return "".join(json.dumps({"step": s}) + "\n" for s in range(1, last + 1))


def test_resume_decisions(tmp_path, accelerator):
    config = run_config_text()  # checkpoint_every=500
    fresh = [
        start.resume_decision(tmp_path / "never-started"),
        start.resume_decision(make_run(tmp_path, "empty")),
        start.resume_decision(make_run(tmp_path, "config-only", config_dot_json=config)),
        start.resume_decision(
            make_run(tmp_path, "early", config_dot_json=config, metrics_dot_jsonl=metrics(40))
        ),
    ]
    assert [d.action for d in fresh] == ["fresh"] * 4
    assert fresh[2].reason == "the run stopped before its first checkpoint"
    # killed while saving its first checkpoint (at step 500): nothing trained is lost
    first = make_run(tmp_path, "first", config_dot_json=config, metrics_dot_jsonl=metrics(500))
    (first / "checkpoints" / "checkpoint_0").mkdir(parents=True)
    (first / "checkpoints" / "checkpoint_0" / "model.safetensors").write_bytes(b"half")
    decision = start.resume_decision(first)
    assert decision.action == "fresh"
    assert [(p.name, r.split(" (")[0]) for p, r in decision.skipped] == [
        ("checkpoint_0", "no manifest.json")
    ]
    save_file({"w": torch.ones(1)}, str(first / "encoder.safetensors"))
    with pytest.raises(CheckpointError, match="no intact checkpoint .*checkpoint_0: no manifest"):
        start.resume_decision(first)

    deleted = make_run(tmp_path, "deleted", config_dot_json=config, metrics_dot_jsonl=metrics(3))
    save_file({"w": torch.ones(1)}, str(deleted / "generator.safetensors"))
    with pytest.raises(ConfigError, match=r"trained run \(generator.safetensors\) but no checkp"):
        start.resume_decision(deleted)
    logged = make_run(tmp_path, "logged", config_dot_json=config, metrics_dot_jsonl=metrics(600))
    with pytest.raises(ConfigError, match="metrics up to step 600.*starting over would"):
        start.resume_decision(logged)
    with pytest.raises(ConfigError, match="holds no run .*thesis.tex"):
        start.resume_decision(make_run(tmp_path, "thesis", thesis_dot_tex="x"))

    prepared(accelerator)
    run = make_run(tmp_path, "ok", config_dot_json=config)
    save_checkpoint(accelerator, run / "checkpoints" / "step-0000500", 500)
    save_checkpoint(accelerator, run / "checkpoints" / "step-0001000", 1000)
    (run / "checkpoints" / "step-0001000" / "optimizer.bin").write_bytes(b"")
    decision = start.resume_decision(run)
    assert decision.action == "continue"
    assert decision.checkpoint == run / "checkpoints" / "step-0000500"
    assert [p.name for p, _ in decision.skipped] == ["step-0001000"]
    (run / "checkpoints" / "step-0000500" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no intact checkpoint .*step-0001000: optimizer"):
        start.resume_decision(run)


def test_resume_overrides_apply_or_refuse_each_setting():
    saved = get_recipe("digits-gali4").with_overrides({"batch_size": "64", "steps": "1500"})
    new = saved.with_overrides({"lr": "1e-3", "steps": "3000", "betas": "0.5,0.999"})
    assert start.check_resume_overrides(saved, new) == {
        "lr": (saved.lr, 1e-3),
        "steps": (1500, 3000),
    }
    refused = saved.with_overrides({"batch_size": "32", "spec": "gali8", "lr": "1e-3"})
    with pytest.raises(
        ConfigError,
        match=r"cannot change batch_size \(64 -> 32\), spec "
        r"\('gali4' -> 'gali8'\)",
    ):
        start.check_resume_overrides(saved, refused)
    assert start.check_resume_overrides(json.loads(saved.to_json()), saved) == {}


def test_a_changed_learning_rate_reaches_the_optimizer():
    torch.manual_seed(0)
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    old = torch.optim.SGD([w], lr=0.1)
    resumed = torch.optim.SGD([w], lr=0.5)
    resumed.load_state_dict(old.state_dict())  # what load_state does: the saved lr comes back
    assert resumed.param_groups[0]["lr"] == 0.1
    assert start.apply_optimizer_settings(resumed, 0.5) == ["lr 0.1 -> 0.5"]
    (w * torch.tensor([3.0, 4.0])).sum().backward()
    resumed.step()
    assert torch.equal(w.detach(), torch.tensor([1.0 - 0.5 * 3, -2.0 - 0.5 * 4]))
    adam = torch.optim.Adam([w], lr=1e-4, betas=(0.5, 0.999))
    assert start.apply_optimizer_settings(adam, 1e-4, (0.9, 0.99)) == [
        "betas (0.5, 0.999) -> (0.9, 0.99)"
    ]


# ------------------------------------------------------------------- values entering the core

LOSSES = [discriminator_loss, product_of_terms_loss, minimax_loss, misclassification_loss]


@pytest.mark.parametrize("loss", LOSSES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_logits_are_named_not_turned_into_a_loss(loss, bad):
    logits = torch.zeros(3, 4, 3)
    assert torch.isclose(discriminator_loss(logits), torch.tensor(2 * math.log(3)))
    logits[1, 2, 0] = bad
    counts = "1 NaN and 0 infinite" if math.isnan(bad) else "0 NaN and 1 infinite"
    with pytest.raises(
        DivergenceError,
        match=rf"logits \[3, 4, 3\] given to {loss.__name__} "
        rf"hold {counts}",
    ):
        loss(logits)


def build_gali(**kwargs) -> GALI:
    generator = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Unflatten(1, (1, 8, 8)))
    head = make_head(build_spec("gali8"))
    return GALI(StochasticEncoder(), generator, head, [ReconstructionChain()], **kwargs)


def optimizers(gali):
    eg = list(gali.encoder.parameters()) + list(gali.generator.parameters())
    return torch.optim.SGD(gali.head.parameters(), lr=0.1), torch.optim.SGD(eg, lr=0.1)


@pytest.mark.parametrize("loss", LOSSES, ids=lambda f: f.__name__)
def test_check_finite_false_leaves_non_finite_logits_to_the_caller(loss):
    logits = torch.zeros(3, 4, 3)
    logits[1, 2, 0] = math.nan
    assert torch.isnan(loss(logits, check_finite=False))


def test_the_objectives_pass_check_finite_to_the_library_losses_only():
    class UserLoss(nn.Module):  # a user's criterion: it takes the head's output alone
        def forward(self, output):
            return output.joint.float().mean()

    torch.manual_seed(0)
    gali = build_gali()
    with torch.no_grad():
        gali.generator[0].weight.fill_(math.nan)
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(DivergenceError, match="given to discriminator_loss"):
        gali(x, role="discriminator")
    for role in ("discriminator", "generator"):
        assert torch.isnan(gali(x, role=role, check_finite=False).loss)
    assert all(torch.isnan(v.loss) for v in gali(x, role="shared", check_finite=False))
    users = build_gali(discriminator_criterion=UserLoss(), generator_criterion=UserLoss())
    for check_finite in (True, False):
        d, g = users(x, role="shared", check_finite=check_finite)
        assert torch.isfinite(d.loss) and torch.isfinite(g.loss)


def test_a_subclass_of_a_library_loss_with_its_own_forward_still_works():
    """A project's loss written before `check_finite` existed, `forward(self, logits)` over a
    library loss, is called as it was written (no unexpected keyword)."""
    from gali_ext.losses import DiscriminatorLoss

    class Scaled(DiscriminatorLoss):
        def forward(self, logits):
            return 2 * super().forward(logits)

    x = torch.rand(4, 1, 8, 8)
    torch.manual_seed(0)
    plain = build_gali()(x, role="discriminator").loss
    torch.manual_seed(0)
    scaled = build_gali(discriminator_criterion=Scaled())(x, role="discriminator").loss
    torch.testing.assert_close(scaled, 2 * plain)


def test_train_step_names_non_finite_logits_and_the_step():
    torch.manual_seed(0)
    gali = build_gali()
    with torch.no_grad():
        gali.generator[0].weight.fill_(math.nan)
    with pytest.raises(DivergenceError, match=r"given to discriminator_loss hold .* at step 7"):
        train_step(gali, [torch.rand(4, 1, 8, 8)], *optimizers(gali), step=7)


@pytest.mark.parametrize("std", [-0.1, math.nan, math.inf])
def test_a_negative_or_nan_instance_noise_std_is_refused(std):
    spec = build_spec("gali8")
    variables = random_variables(spec)
    with pytest.raises(ConfigError, match="instance-noise std >= 0"):
        add_instance_noise(variables, spec, std)
    with pytest.raises(ConfigError, match="instance-noise std >= 0"):
        make_head(spec)(variables, instance_noise_std=std)
    with pytest.raises(ConfigError, match="initial instance-noise std >= 0"):
        instance_noise_std(0, 10, std)
    gali = build_gali()
    with pytest.raises(ConfigError, match="instance-noise std >= 0"):
        train_step(gali, [torch.rand(4, 1, 8, 8)], *optimizers(gali), instance_noise=std)
    unchanged = add_instance_noise(variables, spec, 0.0)
    assert all(unchanged[k] is v for k, v in variables.items())


def test_weights_of_another_kind_of_dtype_are_refused(tmp_path):
    module = nn.Linear(3, 2)
    save_file(
        {"weight": torch.ones(2, 3, dtype=torch.int8), "bias": torch.zeros(2)},
        str(tmp_path / "int8.safetensors"),
    )
    with pytest.raises(
        CheckpointError,
        match="key 'weight' holds torch.int8 values, the model expects torch.float32",
    ):
        load_safetensors_into(module, tmp_path / "int8.safetensors")
    half = {"weight": torch.full((2, 3), 0.5, dtype=torch.float16), "bias": torch.zeros(2)}
    save_file(half, str(tmp_path / "half.safetensors"))
    load_safetensors_into(module, tmp_path / "half.safetensors")  # a precision change is cast
    assert torch.equal(module.weight, torch.full((2, 3), 0.5))


def test_an_empty_batch_is_refused_where_it_enters():
    empty = torch.zeros(0, 1, 8, 8)
    with pytest.raises(ShapeError, match=r"at least one image, got an empty batch \[0, 1, 8, 8\]"):
        Chains(empty, StochasticEncoder(), nn.Identity())
    with pytest.raises(ShapeError, match="at least one image"):
        build_gali().discriminator_loss(empty)
    spec = build_spec("gali8")
    with pytest.raises(ShapeError, match=r"has shape \[0, 1, 8, 8\]: expected a batch"):
        make_head(spec)({k: v[:0] for k, v in random_variables(spec).items()})


@pytest.mark.parametrize("device", DEVICES)
def test_inputs_on_another_device_than_the_model(device):
    gali = build_gali()
    gali.encoder.to(device)
    with pytest.raises(ShapeError, match=rf"the images x are on cpu, the encoder on {device}"):
        gali.discriminator_loss(torch.rand(4, 1, 8, 8))
    spec = build_spec("gali8")
    head = make_head(spec).to(device)
    with pytest.raises(ShapeError, match=rf"is on cpu, the discriminator head on {device}"):
        head(random_variables(spec))


def test_wrong_image_size_dtype_or_latent_width_say_what_was_expected():
    gali = build_gali(image_shape=(1, 8, 8), latent_shape=(6,))
    with pytest.raises(
        ShapeError,
        match=r"expected images x of shape \[B, 1, 8, 8\], got "
        r"\[4, 1, 9, 9\]",
    ):
        gali.discriminator_loss(torch.rand(4, 1, 9, 9))
    with pytest.raises(ShapeError, match="dtype torch.float32 .the encoder's., got torch.float64"):
        gali.discriminator_loss(torch.rand(4, 1, 8, 8, dtype=torch.float64))
    with pytest.raises(ShapeError, match=r"prior sample z of shape \[B, 6\], got \[4, 5\]"):
        gali.discriminator_loss(torch.rand(4, 1, 8, 8), torch.randn(4, 5))
    # without image_shape, E's own failure says what it was given
    with pytest.raises(ShapeError, match=r"encoder E failed on its input of shape \[4, 1, 9, 9\]"):
        build_gali().discriminator_loss(torch.rand(4, 1, 9, 9))
    from gali_ext.gali import build_gali as build_preset
    from gali_ext.recipes.models import build_ali_models

    assert build_preset("ali", build_ali_models("digits", latent_dim=8)).image_shape == (1, 16, 16)


def test_fewer_batches_than_n_dis_is_a_config_error():
    gali = build_gali()
    x = torch.rand(4, 1, 8, 8)
    for batches in ([x], iter([x])):
        with pytest.raises(ConfigError, match="needs n_dis=2 batches, the batches ran out after 1"):
            train_step(gali, batches, *optimizers(gali), n_dis=2)


def test_a_batch_of_one_with_batch_norm_is_a_config_error():
    encoder = StochasticEncoder()
    encoder.net.insert(2, nn.BatchNorm1d(32))
    generator = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Unflatten(1, (1, 8, 8)))
    gali = GALI(encoder, generator, make_head(build_spec("ali")))
    with pytest.raises(ConfigError, match="batch of one image .* batch norm"):
        gali.discriminator_loss(torch.rand(1, 1, 8, 8))
    gali.eval()
    gali.discriminator_loss(torch.rand(1, 1, 8, 8))  # running statistics: fine
    with pytest.raises(ConfigError, match=r"batch_size=1 is invalid: expected an int >= 2"):
        get_recipe("digits-ali").with_overrides({"batch_size": "1"}).validate()


# ---------------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize("name", sorted(UNSUPPORTED_OPTIMIZERS))
def test_optimizers_train_step_cannot_drive_are_refused_and_not_listed(name):
    with pytest.raises(ConfigError, match=rf"optimizer '{name}' cannot be used: it "):
        build_optimizer(name, nn.Linear(2, 2).parameters(), 1e-3)
    assert name not in available_optimizers()
    with pytest.raises(ConfigError) as unknown:
        build_optimizer("adamm", nn.Linear(2, 2).parameters(), 1e-3)
    assert f" {name}," not in str(unknown.value) and "adam, " in str(unknown.value)


@pytest.mark.parametrize("name", available_optimizers())
def test_every_listed_optimizer_drives_a_train_step(name):
    torch.manual_seed(0)
    gali = build_gali()
    eg = list(gali.encoder.parameters()) + list(gali.generator.parameters())
    d_opt = build_optimizer(name, gali.head.parameters(), 1e-3)
    g_opt = build_optimizer(name, eg, 1e-3)
    before = [p.detach().clone() for p in eg]
    result = train_step(gali, [torch.rand(4, 1, 8, 8)], d_opt, g_opt)
    assert math.isfinite(result.d_loss) and math.isfinite(result.g_loss)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, eg))


@pytest.mark.parametrize(
    "betas,lr",
    [
        ((1.5, 0.9), 1e-3),
        ((0.5,), 1e-3),
        ((math.nan, 0.9), 1e-3),
        ((0.5, 0.9), 0.0),
        ((0.5, 0.9), math.nan),
    ],
)
def test_invalid_betas_or_learning_rate_are_config_errors(betas, lr):
    with pytest.raises(ConfigError, match="expected (betas of two numbers in|a learning rate)"):
        build_optimizer("adam", nn.Linear(2, 2).parameters(), lr, betas)


# ------------------------------------------------------------------------ recipe config, CLI


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("seed", "-1", r"seed=-1 is invalid: expected an int in \[0, 2\*\*32\)"),
        ("seed", str(2**32), "seed=4294967296 is invalid"),
        ("betas", "0.5,1.5", r"betas=\(0.5, 1.5\) is invalid: expected two numbers in \[0, 1\)"),
        ("betas", "nan,0.9", "betas=.nan, 0.9. is invalid"),
        ("lr", "nan", "lr=nan is invalid"),
        ("instance_noise", "inf", "instance_noise=inf is invalid"),
        ("optimizer", "lbfgs", "optimizer='lbfgs' is invalid"),
    ],
)
def test_recipe_config_refuses_values_that_used_to_crash_later(key, value, expected):
    with pytest.raises(ConfigError, match=expected):
        get_recipe("digits-ali").with_overrides({key: value}).validate()
    get_recipe("digits-ali").with_overrides({"seed": str(2**32 - 1)}).validate()


def test_check_epochs_and_data_size():
    assert check_epochs(0.5) == 0.5
    for bad in (math.nan, math.inf, 0, -1):
        with pytest.raises(ConfigError, match="--epochs must be a positive finite number"):
            check_epochs(bad)
    config: RecipeConfig = get_recipe("digits-ali").with_overrides({"batch_size": "64"})
    config.check_data_size(128, num_processes=2)
    with pytest.raises(
        ConfigError, match="has 100 images, fewer than one batch of 64 for each of 2 process"
    ):
        config.check_data_size(100, num_processes=2)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--seed", "-1"], "seed=-1 is invalid: expected an int in [0, 2**32)"),
        (["--seed", str(2**32)], "seed=4294967296 is invalid: expected an int in [0, 2**32)"),
        (["--epochs", "nan"], "--epochs must be a positive finite number, got nan"),
        (["--epochs", "inf"], "--epochs must be a positive finite number, got inf"),
        (["--set", "betas=0.5,1.5"], "betas=(0.5, 1.5) is invalid"),
        (["--set", "batch_size=1"], "batch_size=1 is invalid: expected an int >= 2"),
    ],
)
def test_cli_bad_values_end_in_one_error_line_and_exit_2(
    tmp_path, monkeypatch, capsys, args, expected
):
    from gali_ext.recipes.cli import main

    out = tmp_path / "run"
    monkeypatch.setattr(
        sys, "argv", ["gali-ext", "recipe", "digits-ali", "--out", str(out), "--no-progress", *args]
    )
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not out.exists()
