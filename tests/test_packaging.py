"""The distribution installs one import package, gali_ext, whose core stands alone."""

import ast
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APPLICATION = ("accelerate", "typer", "rich", "sklearn", "scipy", "PIL")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the project's files (setuptools writes build/ folders
    beside the sources it builds; a stale one could hide or add modules)."""
    source = tmp_path_factory.mktemp("source")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in listed:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("gali_ext-*.whl")
    return built


@pytest.mark.slow
def test_the_wheel_has_exactly_one_top_level_name(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
        top_level = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        if top_level:
            assert archive.read(top_level[0]).decode().split() == ["gali_ext"]
    assert tops == {"gali_ext"}
    assert "gali_ext/adapters/__init__.py" in names and "gali_ext/recipes/train.py" in names
    assert "gali_ext/adapters/README.md" in names


def _folder_that_shadows(tmp_path: Path) -> Path:
    """A project folder holding its own recipes.py and adapters/ package, both poisoned."""
    folder = tmp_path / "project"
    (folder / "adapters").mkdir(parents=True)
    (folder / "recipes.py").write_text(
        "raise SystemExit('the wrong recipes module was imported')\n"
    )
    (folder / "adapters" / "__init__.py").write_text("raise SystemExit('wrong adapters')\n")
    return folder


@pytest.mark.slow
def test_the_installed_wheel_runs_beside_a_recipes_py_and_an_adapters_folder(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    folder = _folder_that_shadows(tmp_path)
    run = subprocess.run(
        [sys.executable, "-m", "gali_ext.cli", "recipes"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr
    assert "digits-gali4" in run.stdout
    where = subprocess.run(
        [sys.executable, "-c", "import gali_ext.recipes as r; print(r.__file__)"],
        cwd=folder,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(target)},
    )
    assert where.stdout.strip().startswith(str(target))


def test_the_development_install_runs_beside_a_recipes_py_and_an_adapters_folder(tmp_path):
    folder = _folder_that_shadows(tmp_path)
    run = subprocess.run(
        [sys.executable, "-m", "gali_ext.cli", "recipes"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "digits-gali8" in run.stdout
    version = subprocess.run(
        [sys.executable, "-m", "gali_ext.cli", "--version"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )
    import gali_ext

    assert version.stdout.strip() == f"gali-ext {gali_ext.__version__}"


def test_import_gali_ext_loads_the_core_only():
    code = "import json, sys; import gali_ext; print(json.dumps(sorted(m for m in sys.modules)))"
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    loaded = json.loads(run.stdout)
    heavy = sorted({m.split(".")[0] for m in loaded} & set(APPLICATION))
    assert heavy == [], f"import gali_ext loaded {heavy}"
    ours = sorted(m for m in loaded if m.startswith("gali_ext."))
    assert not [m for m in ours if m.startswith(("gali_ext.recipes", "gali_ext.adapters"))], ours
    assert "gali_ext.cli" not in ours
    for name in ("spec", "presets", "chains", "head", "losses", "providers", "gali", "trainer"):
        assert f"gali_ext.{name}" in ours


def _package_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("recipes", "adapters"):
        return parts[1]
    return "cli" if module == "gali_ext.cli" else "core"


def _imports(path: Path, package: str) -> set[str]:
    """The gali_ext modules that a source file of ``package`` imports, relative ones resolved."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                found.update(
                    [f"{base}.{node.module}"]
                    if node.module
                    else [f"{base}.{alias.name}" for alias in node.names]
                )
            else:
                found.add(node.module or "")
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {n for n in found if n.split(".")[0] == "gali_ext"}


def test_the_core_imports_nothing_from_the_application_and_packages_form_no_cycle():
    # repository folder -> the import package it installs as
    folders = {
        "gali_ext": "gali_ext",
        "adapters": "gali_ext.adapters",
        "recipes": "gali_ext.recipes",
    }
    edges: set[tuple[str, str]] = set()
    for folder, package_name in folders.items():
        for path in (ROOT / folder).rglob("*.py"):
            module = ".".join(
                [package_name, *path.relative_to(ROOT / folder).with_suffix("").parts]
            )
            source = _package_of(module)
            if module == "gali_ext.cli":
                continue  # the entry-point shim of `python -m gali_ext.cli`
            package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
            if path.name == "__init__.py":
                package = module.removesuffix(".__init__")
            for imported in _imports(path, package):
                target = _package_of(imported)
                if target != source:
                    edges.add((source, target))
    assert not {e for e in edges if e[0] == "core"}, f"the core imports {edges}"
    assert not (("adapters", "recipes") in edges and ("recipes", "adapters") in edges), edges
    assert not {e for e in edges if e[1] == "cli"}, "nothing may import the CLI shim"
    assert ("recipes", "core") in edges  # the scan sees imports at all


def _blocked(modules, code):
    """Run ``code`` in a fresh interpreter in which ``modules`` cannot be imported (as if not
    installed: ``sys.modules[name] = None``)."""
    prelude = f"import sys\nfor name in {list(modules)!r}:\n    sys.modules[name] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_the_core_install_needs_only_torch_and_safetensors():
    import tomllib

    from gali_ext.extras import EXTRAS

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [d.split(">")[0] for d in project["dependencies"]] == ["torch", "safetensors"]
    assert set(EXTRAS) <= set(project["optional-dependencies"])
    every_extra = sorted({m for modules in EXTRAS.values() for m in modules})
    code = """
import torch
from gali_ext import GALI, MultiClassJointDiscriminatorHead, build_spec, get_preset, train_step
from gali_ext.adapters import FeatureNetwork, check
from torch import nn
spec = build_spec("gali8")
head = MultiClassJointDiscriminatorHead(spec, nn.Sequential(nn.Flatten(), nn.Linear(64, 16)),
                                        nn.Linear(6, 16), joint_hidden=(32,))
E = nn.Sequential(nn.Flatten(), nn.Linear(64, 6))
G = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Unflatten(1, (1, 8, 8)))
gali = GALI(E, G, head, get_preset("gali8").providers())
x = torch.rand(4, 1, 8, 8)
check(gali, x, file=None)
opt = lambda m: torch.optim.Adam(m, 1e-3)
print(train_step(gali, [x], opt(head.parameters()), opt([*E.parameters(), *G.parameters()])))
"""
    run = _blocked(every_extra, code)
    assert run.returncode == 0, run.stderr
    assert "StepMetrics" in run.stdout


def test_a_part_whose_extra_is_missing_names_the_extra():
    run = _blocked(["accelerate"], "import gali_ext.recipes")
    assert run.returncode != 0
    assert (
        "gali_ext.recipes needs gali-ext's 'recipes' extra: pip install 'gali-ext[recipes]' "
        "(missing: accelerate)" in run.stderr
    )
    run = _blocked(["typer"], "import runpy; runpy.run_module('gali_ext.cli', run_name='__main__')")
    assert run.returncode == 2 and "pip install 'gali-ext[recipes]'" in run.stderr
    assert "Traceback" not in run.stderr
    timm_model = "from gali_ext.providers import PretrainedFeatures as P; P('resnet18')"
    run = _blocked(["timm"], timm_model)
    assert "pip install 'gali-ext[timm]' (missing: timm)" in run.stderr


def _module_graph(folder: str, package: str) -> dict[str, set[str]]:
    """Which modules of ``package`` each of its modules imports (anywhere in the file: an
    import inside a function closes a cycle as surely as one at the top)."""
    graph: dict[str, set[str]] = {}
    for path in (ROOT / folder).rglob("*.py"):
        parts = path.relative_to(ROOT / folder).with_suffix("").parts
        if parts[-1] == "__init__":
            module, here = ".".join([package, *parts[:-1]]), ".".join([package, *parts[:-1]])
        else:
            module, here = ".".join([package, *parts]), ".".join([package, *parts[:-1]])
        graph[module] = set()
        for imported in _imports(path, here):
            # `from gali_ext.recipes import train` names the module train, not the package
            candidates = [imported] + [imported.rsplit(".", 1)[0]]
            for name in candidates:
                if name.startswith(package + ".") or name == package:
                    graph[module].add(name)
                    break
        graph[module].discard(module)
    for module in graph:  # keep edges to modules that exist (a name imported from a package)
        graph[module] = {m for m in graph[module] if m in graph}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a list of modules, or None (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


@pytest.mark.parametrize(
    ("folder", "package"), [("recipes", "gali_ext.recipes"), ("adapters", "gali_ext.adapters")]
)
def test_no_import_cycle_between_the_modules_of_a_package(folder, package):
    graph = _module_graph(folder, package)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_sees_absolute_relative_and_function_level_imports(tmp_path):
    """The finder must see `gali_ext.recipes.*` absolute imports, relative ones and imports
    inside functions, else the test above passes on a package full of cycles."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    graph = _module_graph("recipes", "gali_ext.recipes")
    assert "gali_ext.recipes.build" in graph["gali_ext.recipes.train"]  # absolute import
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from .evaluate import x\nfrom gali_ext.recipes import train\n")
    assert _imports(source, "gali_ext.recipes") == {"gali_ext.recipes.evaluate", "gali_ext.recipes"}


def test_no_file_of_the_core_is_much_over_600_lines():
    """One job per module: the head's computation, wiring and diagnostics live apart."""
    lengths = {
        path.relative_to(ROOT).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
        for path in (ROOT / "gali_ext").rglob("*.py")
    }
    assert {path: n for path, n in lengths.items() if n > 600} == {}
