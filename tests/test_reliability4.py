"""Issue 35 ("Reliability, round four"): what others share is loaded safely, and every path a
command writes to fails in one line.

Two tests are generated: one walks every command of the ``gali-ext`` app and every option or
argument that takes a path (enumerated from the typer app, so that a new one fails until it is
classified) with bad paths; one writes wrong types, negative and huge values into every field
of an export's ``config.json``. The command line runs in this process (``tests._helpers.run_cli``)
on one tiny trained run, its evaluator and its export.
"""

import errno
import json
import os
import shutil
import socket
import stat
import time
import typing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gali_ext.errors import CheckpointError, ConfigError
from gali_ext.recipes import checkpoints, cli, files, outputs
from gali_ext.recipes.export import HubEncoder, HubGenerator, export_run
from gali_ext.recipes.hub import EXPORT_FIELDS
from gali_ext.recipes.lock import RunLock
from tests._helpers import TINY_RUN, one_error, train_run
from tests._helpers import run_cli as cli_run


def tree(folder: Path) -> dict[str, tuple]:
    """Every entry below ``folder``: its kind, and a file's size and modification time (a link
    is not followed)."""
    found = {}
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = Path(root) / name
            info = os.lstat(path)
            key = path.relative_to(folder).as_posix()
            if stat.S_ISLNK(info.st_mode):
                found[key] = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                found[key] = ("folder",)
            else:
                found[key] = ("file", info.st_size, info.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """digits-ali trained 4 steps: checkpoint_0 (step 2) and checkpoint_1 (step 4)."""
    run = tmp_path_factory.mktemp("base") / "run"
    train_run(run, [*TINY_RUN, "--steps", "4"])
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A copy of the trained run, for one test to change."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    return export_run(trained, tmp_path_factory.mktemp("export") / "hub").folder


# --- 1. a shared model's config.json -------------------------------------------------------------


def forge(folder: Path, tmp_path: Path, **fields) -> Path:
    """A copy of export ``folder`` whose config.json has ``fields`` (None: removed)."""
    copy = Path(shutil.copytree(folder, tmp_path / f"forged-{len(list(tmp_path.iterdir()))}"))
    config = json.loads((copy / "config.json").read_text())
    for key, value in fields.items():
        config[key] = value
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("latent_dim", 100000000000, "expected an int in [1, 256] (a code of at most the 1 x 16"),
        ("latent_dim", -5, "expected an int in [1, 256]"),
        ("latent_dim", "32", "expected an int in [1, 256]"),
        ("channels", 1000000000, "expected an int in [1, 4] (grayscale, RGB or RGBA images)"),
    ],
)
def test_the_issues_forged_configs_are_one_config_error(exported, tmp_path, field, value, expected):
    folder = forge(exported, tmp_path, **{field: value})
    for loader in (HubEncoder, HubGenerator):
        with pytest.raises(ConfigError) as caught:
            loader.from_pretrained(folder)
        message = str(caught.value)
        assert f"config.json field {field!r} is {value!r}: {expected}" in message, message
        assert "\n" not in message


def wrong_type(value):
    """A JSON value of another type than ``value``'s."""
    if isinstance(value, bool):
        return "true"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return 7
    if isinstance(value, list):
        return "[]"
    if isinstance(value, dict):
        return [1]
    return "null"


def test_every_config_field_refuses_wrong_types_negative_and_huge_values(exported, tmp_path):
    written = json.loads((exported / "config.json").read_text())
    schema = {f.name: f for f in EXPORT_FIELDS}
    assert set(written) <= set(schema), "a field export writes is not in the schema (hub.py)"
    folder = Path(shutil.copytree(exported, tmp_path / "forged"))
    cases = 0
    for name in schema:
        for value in (wrong_type(written.get(name)), -5, 10**11):
            (folder / "config.json").write_text(json.dumps({**written, name: value}))
            for loader in (HubEncoder, HubGenerator):
                started = time.perf_counter()
                with pytest.raises(ConfigError) as caught:
                    loader.from_pretrained(folder)
                message = str(caught.value)
                assert name in message and repr(value)[:40] in message, message
                assert "\n" not in message
                assert time.perf_counter() - started < 2  # refused before anything is built
                cases += 1
        if schema[name].required:  # a reader needs it
            (folder / "config.json").write_text(
                json.dumps({k: v for k, v in written.items() if k != name})
            )
            lacks = "is not a gali-ext export" if name == "format" else f"lacks {name!r}: expected"
            with pytest.raises(ConfigError, match=lacks):
                HubEncoder.from_pretrained(folder)
    assert cases == 2 * 3 * len(schema)
    (folder / "config.json").write_text(json.dumps(written))
    assert HubEncoder.from_pretrained(folder).latent_dim == written["latent_dim"]


def test_a_size_in_range_that_the_weights_do_not_have_is_refused_before_building(
    exported, tmp_path
):
    folder = forge(exported, tmp_path, latent_dim=200)
    with pytest.raises(CheckpointError, match=r"the weights do not fit its config.json .*shape"):
        HubEncoder.from_pretrained(folder)


def test_export_checks_what_it_writes_against_the_same_schema(trained, tmp_path):
    config = json.loads((trained / "config.json").read_text())
    config["latent_dim"] = 300  # more than the 256 values of a digits image
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError):  # the weights no longer fit: nothing is exported
        export_run(run, tmp_path / "hub")
    assert not (tmp_path / "hub").exists()


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache; any connection fails as it does without a network."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))

    def unreachable(*args, **kwargs):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(socket.socket, "connect", unreachable)
    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    return constants


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "no network"])
def test_a_repo_id_offline_is_one_line_at_once(offline_hub, monkeypatch, how):
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setattr(offline_hub, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        HubEncoder.from_pretrained("someone/gali-digits")
    message = str(caught.value)
    assert time.perf_counter() - started < 5  # huggingface_hub's retries take 25 s
    assert message.startswith(
        "'someone/gali-digits' is not in the local Hugging Face cache and the Hub cannot be "
        "reached ("
    ), message
    assert "from_pretrained('path/to/export')" in message and "\n" not in message


def test_a_cached_repo_loads_offline(offline_hub, exported, monkeypatch, tmp_path):
    """The layout huggingface_hub's cache has (refs/main names the snapshot)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(offline_hub.HF_HUB_CACHE) / "models--someone--gali-digits"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(exported, repo / "snapshots" / commit)
    encoder = HubEncoder.from_pretrained("someone/gali-digits")  # no network: from the cache
    reference = HubEncoder.from_pretrained(exported)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(encoder(x)[0], reference(x)[0])
    with pytest.raises(ConfigError, match="neither a folder nor a Hub repository id"):
        HubEncoder.from_pretrained(str(tmp_path / "no" / "such" / "export"))


# --- 3. nothing is created in a refused folder ---------------------------------------------------


def test_resume_on_a_project_folder_leaves_no_lock(tmp_path, capsys):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "train.py").write_text("print('mine')\n")
    before, stamp = tree(project), os.stat(project).st_mtime_ns
    code, _, err = cli_run(
        capsys, "recipe", *TINY_RUN, "--out", str(project), "--resume", "--steps", "2"
    )
    assert "holds no run" in one_error(code, err)
    assert tree(project) == before and os.stat(project).st_mtime_ns == stamp  # not even a .lock


def test_a_lock_removes_the_lock_file_it_created(tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with RunLock(folder):
        assert (folder / ".lock").is_file()
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    (folder / ".lock").write_text("")  # one a killed run left: kept, as it was found
    with RunLock(folder):
        pass
    assert (folder / ".lock").is_file()


# --- 4 and 5. what the attack suite found ------------------------------------------------------


def test_eval_out_inside_a_runs_checkpoints_is_refused(run, capsys):
    before = tree(run)
    code, _, err = cli_run(capsys, "eval", str(run), "--out", str(run / "checkpoints"))
    line = one_error(code, err)
    assert line == (
        f"error: --out '{run / 'checkpoints'}' is 'checkpoints', a folder of the run directory "
        f"'{run}' that only the run itself writes: choose another --out outside the run's own "
        "files and folders"
    )
    assert tree(run) == before  # no evaluator-digits trained into checkpoints/


def swap_optimizers(checkpoint: Path) -> None:
    """Swap the two optimizer files and forge a manifest that matches."""
    first, second = checkpoint / "optimizer.bin", checkpoint / "optimizer_1.bin"
    first.rename(checkpoint / "swap")
    second.rename(first)
    (checkpoint / "swap").rename(second)
    step = json.loads((checkpoint / "train_state.json").read_text())["step"]
    checkpoints.write_manifest(checkpoint, step)


@pytest.mark.slow
def test_swapped_optimizer_files_under_a_forged_manifest_fall_back(run, capsys):
    swap_optimizers(run / "checkpoints" / "checkpoint_1")
    with pytest.warns(
        files.RunDirectoryWarning,
        match=r"skipped checkpoint_1 \(optimizer states that do not fit the run: optimizer.bin: "
        r"parameter group 0 holds \d+ parameters, optimizer 0's holds \d+\)",
    ):
        code, out, err = cli_run(
            capsys, "recipe", *TINY_RUN, "--out", str(run), "--resume", "--steps", "4"
        )
    assert code == 0, err
    assert "resumed from" in out and "checkpoint_0 at step 2" in out
    assert (run / "damaged-checkpoints" / "checkpoint_1").is_dir()
    for checkpoint in checkpoints.list_checkpoints(run / "checkpoints"):
        swap_optimizers(checkpoint)
    code, _, err = cli_run(
        capsys, "recipe", *TINY_RUN, "--out", str(run), "--resume", "--steps", "6"
    )
    line = one_error(code, err)
    assert "fits this run's model and optimizers" in line and "optimizer.bin" in line


def test_eval_of_all_nan_ema_weights_is_one_line(run, capsys, evaluator):
    path = run / "encoder_ema.safetensors"
    weights = load_file(str(path))
    nan = {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in weights.items()}
    save_file(nan, path)
    code, _, err = cli_run(capsys, "eval", str(run), "--evaluator", str(evaluator))
    line = one_error(code, err)
    assert "encoder_ema.safetensors holds" in line and "non-finite value(s)" in line
    assert "score the trained weights instead (--raw-weights)" in line
    assert not (run.parent / "eval.json").exists()


def test_an_evaluator_json_without_model_or_with_forged_sizes_is_one_line(
    run, evaluator, tmp_path, capsys
):
    broken = Path(shutil.copytree(evaluator, tmp_path / "evaluator-digits"))
    info = json.loads((broken / "evaluator.json").read_text())
    for forged, expected in (
        ({k: v for k, v in info.items() if k != "model"}, 'lacks "model"'),
        ({**info, "model": {**info["model"], "width": 10**11}}, "expected an int in [1, 65536]"),
        ({**info, "model": {**info["model"], "width": 64}}, "does not fit its evaluator.json"),
        ({**info, "model": {**info["model"], "width": "32"}}, "'width' is '32': expected an int"),
    ):
        (broken / "evaluator.json").write_text(json.dumps(forged))
        code, _, err = cli_run(capsys, "eval", str(run), "--evaluator", str(broken))
        assert expected in one_error(code, err)


def test_bench_on_cuda_without_a_gpu_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = cli_run(capsys, "bench", "--device", "cuda", "--out", str(tmp_path / "b.json"))
    assert one_error(code, err) == (
        "error: --device cuda: this machine has no CUDA device (torch.cuda.is_available() is "
        "False): pass --device cpu, or omit --device"
    )
    code, _, err = cli_run(capsys, "bench", "--device", "gpu", "--out", str(tmp_path / "b.json"))
    assert "--device 'gpu' is not a device torch knows" in one_error(code, err)


def test_bench_out_in_a_missing_folder_is_refused_before_it_runs(capsys, monkeypatch, tmp_path):
    from gali_ext.recipes import bench

    def timed(*args, **kwargs):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(bench, "_step_variants", timed)
    code, _, err = cli_run(capsys, "bench", "--out", str(tmp_path / "missing_dir" / "b.json"))
    assert one_error(code, err) == (
        f"error: --out '{tmp_path / 'missing_dir' / 'b.json'}': its folder "
        f"'{tmp_path / 'missing_dir'}' does not exist: create it first, or choose another --out"
    )


def test_a_model_on_the_meta_device_given_meta_inputs_computes_shapes():
    from gali_ext import DiscriminatorLoss, MinimaxLoss, ProductOfTermsLoss, build_spec
    from gali_ext.adapters import monolithic_head
    from tests._helpers import random_variables

    class JointD(torch.nn.Module):  # a D(x, z) as a user writes it
        def __init__(self):
            super().__init__()
            self.x = torch.nn.Linear(64, 8)
            self.z = torch.nn.Linear(6, 8)
            self.out = torch.nn.Linear(16, 1)

        def forward(self, x, z):
            return self.out(torch.cat([self.x(x.flatten(1)), self.z(z)], 1))

    spec = build_spec("ali")
    with torch.device("meta"):
        head = monolithic_head(spec, JointD())
    values = {k: v.to("meta") for k, v in random_variables(spec, batch=16).items()}
    logits = head(values)
    assert logits.joint.shape == (2, 16, 2) and logits.joint.is_meta
    for loss in (DiscriminatorLoss(), ProductOfTermsLoss(), MinimaxLoss()):
        value = loss(logits)
        assert value.shape == () and value.is_meta


# --- 2. the generated walk: every command, every path option, every bad path --------------------

# How each path parameter of the app is used: outputs are checked by outputs.check_output_path;
# inputs are read. A new command or path option fails test_every_path_option_is_classified
# until it is added here.
OUT_FOLDER, OUT_FILE, OUT_NEW_FOLDER = "output folder", "output file", "new output folder"
IN_RUN, IN_FOLDER, IN_FILE, REMOVED = "run read", "folder read", "file read", "removed option"
ROLES = {
    ("recipe", "out"): OUT_FOLDER,
    ("recipe", "data_dir"): OUT_FOLDER,  # with --download; read otherwise (below)
    ("recipe", "fid_weights"): IN_FILE,
    ("sample", "run_dir"): IN_RUN,
    ("sample", "out"): OUT_FOLDER,
    ("train-evaluator", "out"): OUT_FOLDER,
    ("train-evaluator", "data_dir"): IN_FOLDER,
    ("eval", "run_dirs"): IN_RUN,
    ("eval", "evaluator"): OUT_FOLDER,  # an evaluator is trained there when it holds none
    ("eval", "out"): OUT_FOLDER,
    ("eval", "fid_weights"): IN_FILE,
    ("eval", "inception_weights"): REMOVED,
    ("study", "out"): OUT_FOLDER,
    ("bench", "out"): OUT_FILE,
    ("export", "run_dir"): IN_RUN,
    ("export", "out"): OUT_NEW_FOLDER,
}
NO_PATHS = {"presets", "recipes", "check"}
EVAL = "--svm-samples 50 --svm-draws 1"
# The command line of each case: P is the path under test, RUN the trained run, EV its
# evaluator, FRESH a folder that does not exist.
TINY = " ".join(TINY_RUN)
COMMANDS = {
    key: line.split()
    for key, line in {
        ("recipe", "out"): f"recipe {TINY} --steps 2 --out P",
        ("recipe", "data_dir"): "recipe svhn-gali8 --download --data-dir P --out FRESH",
        ("recipe", "fid_weights"): f"recipe {TINY} --steps 2 --out FRESH --fid-weights P",
        ("sample", "run_dir"): "sample P --out FRESH",
        ("sample", "out"): "sample RUN --out P",
        ("train-evaluator", "out"): "train-evaluator digits --out P",
        ("train-evaluator", "data_dir"): "train-evaluator svhn --data-dir P --out FRESH",
        ("eval", "run_dirs"): f"eval P --evaluator EV --out FRESH {EVAL}",
        ("eval", "evaluator"): f"eval RUN --evaluator P --out FRESH {EVAL}",
        ("eval", "out"): f"eval RUN --evaluator EV --out P {EVAL}",
        ("eval", "fid_weights"): f"eval RUN --evaluator EV --out FRESH --fid-weights P {EVAL}",
        ("eval", "inception_weights"): "eval RUN --inception-weights P",
        ("study", "out"): "study --out P --steps 1 --seeds 1 --jobs 1",
        ("bench", "out"): "bench --out P --repeats 1 --warmup 0",
        ("export", "run_dir"): "export P FRESH",
        ("export", "out"): "export RUN P",
    }.items()
}
# recipe --data-dir without --download is read
READ_DATA_DIR = "recipe svhn-gali8 --data-dir P --out FRESH".split()

ACCEPTED = "accepted by the path check"
# The bad paths (relative to the sandbox) of each role, and whether the command refuses them
# (True) or the path check accepts them (False: it stops the command there, see walk()).
BAD_PATHS = {
    OUT_FOLDER: {
        "a file": ("file.txt", True),
        "a missing parent": ("missing/deeper/out", False),  # created, as mkdir -p does
        "a read-only folder": ("read-only/out", True),
        "/proc": ("/proc/self/newrun", True),
        "a symlink": ("link", True),
        "a run's own subfolder": ("run/checkpoints/out", True),
        "an empty string": ("", True),
    },
    OUT_FILE: {
        "a file": ("file.txt", False),  # replaced, as bench.json is by each benchmark
        "a folder": ("elsewhere", True),
        "a missing parent": ("missing/b.json", True),
        "a read-only folder": ("read-only/b.json", True),
        "/proc": ("/proc/self/b.json", True),
        "a symlink": ("link.json", True),
        "a run's own file": ("run/summary.json", True),
        "a run's own subfolder": ("run/checkpoints/b.json", True),
        "an empty string": ("", True),
    },
    OUT_NEW_FOLDER: {
        "a file": ("file.txt", True),
        "a non-empty folder": ("elsewhere", True),
        "a missing parent": ("missing/deeper/out", False),
        "a read-only folder": ("read-only/out", True),
        "/proc": ("/proc/self/newrun", True),
        "a symlink": ("link", True),
        "a run's own subfolder": ("run/checkpoints/out", True),
        "an empty string": ("", True),
    },
    # reading through a link or from a read-only folder is fine: those are no bad inputs
    IN_RUN: {
        "a file": ("file.txt", True),
        "a missing parent": ("missing/deeper/run", True),
        "/proc": ("/proc/self/newrun", True),
        "a run's own subfolder": ("run/checkpoints", True),
        "an empty string": ("", True),
    },
    IN_FOLDER: {
        "a file": ("file.txt", True),
        "a missing parent": ("missing/deeper/data", True),
        "/proc": ("/proc/self/newrun", True),
        "a run's own subfolder": ("run/checkpoints", True),
        "an empty string": ("", True),
    },
    IN_FILE: {
        "a file that is no weights": ("file.txt", True),
        "a folder": ("elsewhere", True),
        "a missing parent": ("missing/deeper/w.pth", True),
        "/proc": ("/proc/self/w.pth", True),
        "a run's own subfolder": ("run/checkpoints", True),
        "an empty string": ("", True),
    },
    REMOVED: {"any path": ("file.txt", True), "an empty string": ("", True)},
}


def path_parameters() -> dict[tuple[str, str], str]:
    """(command, parameter) of every parameter of the app annotated ``Path`` or
    ``list[Path]``, with its option string (the metavar of an argument), read from the typer
    app itself."""
    import inspect

    import typer.main

    group = typer.main.get_command(cli.app)
    found = {}
    for info in cli.app.registered_commands:
        name = info.name or info.callback.__name__.replace("_", "-")
        hints = typing.get_type_hints(info.callback)
        declared = inspect.signature(info.callback).parameters
        for param in group.commands[name].params:
            if hints.get(param.name) in (Path, list[Path]):
                # an empty path must reach the command as "", not as Path("") == Path(".")
                parser = declared[param.name].default.parser
                assert parser is cli._path, f"{name} {param.name}: declare it with parser=_path"
                found[(name, param.name)] = param.opts[0]
    return found


def test_every_path_option_is_classified():
    import typer.main

    commands = set(typer.main.get_command(cli.app).commands)
    found = path_parameters()
    assert set(found) == set(ROLES), "classify the new path option in ROLES and COMMANDS"
    assert commands == {c for c, _ in ROLES} | NO_PATHS, "classify the new command"
    assert set(COMMANDS) == set(ROLES)
    for key, line in COMMANDS.items():  # each command line passes P to that option
        option = found[key]
        assert "P" in line and (not option.startswith("-") or line[line.index("P") - 1] == option)


@pytest.fixture(scope="module")
def sandbox(trained, evaluator, tmp_path_factory):
    """A folder holding the run, its evaluator and the bad paths; the commands run in it."""
    root = tmp_path_factory.mktemp("sandbox")
    shutil.copytree(trained, root / "run")
    shutil.copytree(evaluator, root / "evaluator-digits")
    (root / "file.txt").write_text("not a folder\n")
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "notes.txt").write_text("mine\n")
    (root / "link").symlink_to(root / "elsewhere")
    (root / "link.json").symlink_to(root / "elsewhere" / "notes.txt")
    (root / "read-only").mkdir()
    (root / "read-only").chmod(0o555)
    yield root
    (root / "read-only").chmod(0o755)


def cases():
    for key, role in ROLES.items():
        for label in BAD_PATHS[role]:
            yield pytest.param(key, role, label, id=f"{key[0]}-{key[1]}-{label}")
    for label in BAD_PATHS[IN_FOLDER]:
        yield pytest.param(
            ("recipe", "data_dir"), IN_FOLDER, label, id=f"recipe-data_dir-read-{label}"
        )


@pytest.mark.parametrize(("key", "role", "label"), list(cases()))
def test_every_path_option_with_every_bad_path_is_one_line(
    sandbox, key, role, label, capsys, monkeypatch
):
    relative, refused = BAD_PATHS[role][label]
    if relative.startswith("/proc") and not Path("/proc/self").is_dir():
        pytest.skip("no /proc on this system")
    if label == "a read-only folder" and os.access(sandbox / "read-only", os.W_OK):
        pytest.skip(
            "running as root: a folder of mode 555 is writable to root, so there is nothing to "
            "refuse (the check asks the folder itself, not its permission bits)"
        )
    path = str(sandbox / relative) if relative and not relative.startswith("/") else relative
    template = READ_DATA_DIR if role == IN_FOLDER and key[0] == "recipe" else COMMANDS[key]
    values = {"P": path, "RUN": str(sandbox / "run"), "EV": str(sandbox / "evaluator-digits")}
    values["FRESH"] = str(sandbox / "fresh")
    args = [values.get(a, a) for a in template]

    # An accepted output path stops the command right after its check: nothing is trained,
    # downloaded or measured, and the line says so.
    check = outputs._check_writable

    def stop_when_accepted(out, folder, option):
        check(out, folder, option)
        if os.fspath(out) == path:
            raise ConfigError(f"{ACCEPTED}: {option} {path!r}")

    def no_network(*a, **k):
        raise AssertionError("a download started")

    monkeypatch.setattr(outputs, "_check_writable", stop_when_accepted)
    monkeypatch.setattr("gali_ext.recipes.data.fetch", no_network)
    monkeypatch.chdir(sandbox)
    before = tree(sandbox)
    code, _, err = cli_run(capsys, *args)
    line = one_error(code, err)
    if refused:
        assert ACCEPTED not in line, line
        shown = repr(path) if path else "''"
        assert shown in line or path in line or (key[1] == "inception_weights"), line
    else:
        assert line.startswith(f"error: {ACCEPTED}: ") and line.endswith(repr(path)), line
    assert tree(sandbox) == before, "a file was created or removed"
