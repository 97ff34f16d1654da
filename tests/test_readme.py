"""The README's commands and code are the ones that work."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_ci_runs_exactly_the_readme_test_command():
    block = re.search(r"<!-- test-command -->\n```\n(.+?)\n```\n<!-- /test-command -->", README,
                      re.S)  # fmt: skip
    assert block, "README.md lost its test command markers"
    extracted = subprocess.run(
        ["bash", "-c", "sed -n '/<!-- test-command -->/,/<!-- \\/test-command -->/p' README.md"
         " | grep -v -e '^<!--' -e '^```'"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert extracted == block.group(1).strip()
    assert "pytest" in extracted
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in ci and '"$status" -eq 5' in ci


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.+?)```", README, re.S)
    runnable = [b for b in blocks if "my_" not in b]
    assert runnable, "README has no runnable example"
    for code in runnable:
        exec(compile(code, "README.md", "exec"), {})
