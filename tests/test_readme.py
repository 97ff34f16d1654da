"""The README's commands and code are the ones that work."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_ci_runs_exactly_the_readme_test_command():
    block = re.search(
        r"<!-- test-command -->\n```\n(.+?)\n```\n<!-- /test-command -->", README, re.S
    )
    assert block, "README.md lost its test command markers"
    extracted = subprocess.run(
        [
            "bash",
            "-c",
            "sed -n '/<!-- test-command -->/,/<!-- \\/test-command -->/p' README.md"
            " | grep -v -e '^<!--' -e '^```'",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert extracted == block.group(1).strip()
    assert "pytest" in extracted
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in ci and '"$status" -eq 5' in ci


@pytest.mark.parametrize("document", ["README.md", "adapters/README.md"])
def test_every_python_block_runs_as_written(document, tmp_path, monkeypatch):
    """Each document's Python blocks run top to bottom in one namespace, as a reader would
    paste them (in an empty folder: the files they write stay out of the repository); none is
    skipped."""
    from gali_ext import presets

    monkeypatch.chdir(tmp_path)
    # the presets a block registers (README's gali_rot) leave with the test
    monkeypatch.setattr(presets, "_REGISTRY", dict(presets._REGISTRY))
    blocks = re.findall(r"```python\n(.+?)```", (ROOT / document).read_text(), re.S)
    assert blocks, f"{document} has no Python example"
    namespace: dict = {"__name__": "readme"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{document} (block {i + 1})", "exec"), namespace)
