"""A user's presets and providers on the command line: `--import` fails in one line, an
installed package registers its presets through the entry-point group `gali_ext.presets`, and a
run remembers where its preset came from (issue 33, item 3; issue 35's `--import` case)."""

import json
import sys
import textwrap
import warnings

import pytest

from gali_ext import available_presets, get_preset, presets
from gali_ext.errors import ConfigError, SpecError
from gali_ext.recipes import plugins
from tests._helpers import error_lines, run_cli


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """An empty current folder whose modules `--import` finds; the modules and presets the
    test adds are removed after it."""
    monkeypatch.chdir(tmp_path)
    modules, registered = set(sys.modules), set(presets._REGISTRY)
    imported = list(plugins._IMPORTED)
    yield tmp_path
    for name in set(sys.modules) - modules:
        del sys.modules[name]
    for name in set(presets._REGISTRY) - registered:
        del presets._REGISTRY[name]
    plugins._IMPORTED[:] = imported


@pytest.mark.parametrize(
    "module, source, expected",
    [
        (
            "../../etc/passwd",
            None,
            "error: --import '../../etc/passwd': expected a module name as in an import "
            "statement, such as my_presets or my_project.gali, not a file path or a relative "
            "name: for a file DIR/NAME.py, run from DIR (or add DIR to PYTHONPATH) and pass "
            "--import NAME",
        ),
        ("my_presets.py", "x = 1", "not a file path or a relative name"),
        (".relative", None, "not a file path or a relative name"),
        (
            "absent_module_xyz",
            None,
            "error: --import absent_module_xyz: no module named 'absent_module_xyz' in the "
            "current folder, on PYTHONPATH or among the installed packages: put "
            "absent_module_xyz.py in the current folder, add its folder to PYTHONPATH, or pip "
            "install its package",
        ),
        (
            "raising_module",
            "\n\nraise ValueError('no GPU here')",
            "error: --import raising_module: the module raised ValueError while it was imported "
            "({folder}/raising_module.py:3): no GPU here; fix the module",
        ),
        (
            "needing_module",
            "import missing_dependency_xyz",
            "error: --import needing_module: the module imports 'missing_dependency_xyz', which "
            "is not installed ({folder}/needing_module.py:1): pip install it",
        ),
        (
            "broken_module",
            "def f(:\n",
            "error: --import broken_module: the module raised SyntaxError while it was imported "
            "({folder}/broken_module.py:1): invalid syntax; fix the module",
        ),
        (
            "twice_module",
            "from gali_ext import register_preset\nregister_preset('ali', [('x0', 'z0'), "
            "('xp0', 'zp0')])",
            "error: --import twice_module: the module raised SpecError while it was imported "
            "({folder}/twice_module.py:2): a preset named 'ali' is already registered",
        ),
    ],
)
def test_a_failing_import_is_one_line_naming_the_module_and_the_fix(
    folder, capsys, module, source, expected
):
    if source is not None:
        (folder / (module if module.endswith(".py") else f"{module}.py")).write_text(source)
    code, out, err = run_cli(capsys, "--import", module, "recipes")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and error_lines(err) == [err.strip()]
    assert expected.format(folder=folder) in err


@pytest.mark.parametrize(
    "factory, expected",
    [
        ("../../etc/passwd:build", "error: check '../../etc/passwd': expected a module name"),
        ("absent_module_xyz:build", "error: check absent_module_xyz: no module named"),
    ],
)
def test_check_imports_its_factory_as_import_does(folder, capsys, factory, expected):
    code, out, err = run_cli(capsys, "check", factory)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(expected)


def test_an_imported_module_is_recorded(folder, capsys):
    (folder / "tri_presets.py").write_text(
        "from gali_ext import register_preset\n"
        "register_preset('tri_plugin', [('x0', 'z0'), ('xp0', 'zp0'), ('x0', 'z1')], [])\n"
    )
    with pytest.raises(Exception, match="reconstruction chain"):
        plugins.import_module("tri_presets")  # the preset lacks ReconstructionChain
    (folder / "good_presets.py").write_text(
        "from gali_ext import register_preset\n"
        "register_preset('pair_plugin', [('x0', 'z0'), ('xp0', 'zp0')])\n"
    )
    code, out, _ = run_cli(capsys, "--import", "good_presets", "presets")
    assert code == 0 and "pair_plugin" in out
    assert plugins.imports_record("pair_plugin") == {
        "imports": ["good_presets"],
        "preset_source": "good_presets",
    }
    assert plugins.imports_record("gali4")["preset_source"] == "gali_ext.presets"


def _install(site, name, entry_point, source):
    """A package as pip would install it: its module, and a dist-info folder whose
    entry_points.txt names ``entry_point`` in the group gali_ext.presets."""
    (site / f"{name}.py").write_text(textwrap.dedent(source))
    info = site / f"{name.replace('_', '-')}-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[gali_ext.presets]\n{entry_point}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A site-packages folder on sys.path, the entry points read again, and what they
    registered removed after the test."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(presets, "_entry_points_loaded", False)
    monkeypatch.setattr(presets, "_entry_point_failures", [])
    modules, registered = set(sys.modules), set(presets._REGISTRY)
    yield site
    for name in set(sys.modules) - modules:
        del sys.modules[name]
    for name in set(presets._REGISTRY) - registered:
        del presets._REGISTRY[name]


def test_an_installed_package_registers_its_presets_and_providers_by_entry_point(site):
    _install(
        site,
        "gali_spin",
        "spin = gali_spin:register",
        """
        import torch
        from gali_ext import register_preset
        from gali_ext.providers import FeedbackProvider

        class Flip(FeedbackProvider):
            signatures = {"FlipEP": ("image", "image")}

            def function_for(self, name):
                if name == "FlipEP":
                    return lambda node, chains: chains[node.arg.name].flip(-1)

        def register():
            register_preset("spin_ep", [("x0", "z0"), ("xp0", "zp0"), ("FlipEP(x0)", "z0")],
                            [Flip])
        """,
    )
    assert "spin_ep" in available_presets()  # no import: the entry point registered it
    preset = get_preset("spin_ep")
    assert preset.source == "entry point spin = gali_spin:register of gali_spin 0.3"
    assert preset.spec.slot_kinds == ("image", "latent")
    assert [type(p).__name__ for p in preset.providers()] == ["Flip"]


def test_a_broken_entry_point_warns_once_and_leaves_the_others(site):
    _install(site, "gali_broken", "broken = gali_broken", "raise RuntimeError('half installed')")
    with pytest.warns(UserWarning, match="entry point broken = gali_broken of gali_broken 0.3"):
        names = available_presets()
    assert "gali4" in names
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        available_presets()  # loaded once: no second warning
        with pytest.raises(SpecError, match="RuntimeError: half installed; fix or uninstall it"):
            get_preset("broken_preset")


def test_a_resume_without_the_preset_says_what_to_import(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    launch = {"world_size": 1, "imports": ["my_rotation"], "preset_source": "my_rotation"}
    (run / "config.json").write_text(json.dumps({"spec": "gali_rot", "launch": launch}))
    with pytest.raises(ConfigError) as error:
        plugins.check_run_preset(run, "gali_rot", "recipe digits-ali --resume --out run")
    assert str(error.value) == (
        f"{str(run)!r} was trained with the preset 'gali_rot', registered by the module "
        "my_rotation: import it, `gali-ext --import my_rotation recipe digits-ali --resume "
        "--out run`"
    )
    launch["preset_source"] = "entry point spin = gali_spin:register of gali_spin 0.3"
    launch["imports"] = []
    (run / "config.json").write_text(json.dumps({"spec": "spin_ep", "launch": launch}))
    with pytest.raises(ConfigError, match="which is not installed here: install that package"):
        plugins.check_run_preset(run, "spin_ep")
    plugins.check_run_preset(run, "gali4")  # a registered preset needs nothing


def test_a_study_worker_imports_what_the_study_imported(folder, monkeypatch):
    from gali_ext.recipes import study

    (folder / "worker_presets.py").write_text("IMPORTED = True\n")
    monkeypatch.setattr(study, "die_with_parent", lambda parent: None)
    study._start_worker(0, ["worker_presets"])
    assert sys.modules["worker_presets"].IMPORTED
