"""References to Markdown files and their sections point at something that exists.

The project's design document is docs/design.md; code and docs cite it as
"docs/design.md, section N". :func:`check_references` finds, in one file's text,

- ``<path>.md, section N`` (also ``sec. N``, ``sections N and M``, a reference wrapped onto a
  comment's next line) and ``section N of <path>.md``: the file must exist and have a
  ``## N.`` heading (a subsection ``N.M`` needs a heading ``### N.M``);
- Markdown links ``[text](<path>.md)``, resolved from the linking file's folder;
- backticked paths ending in ``.md``, resolved from the repository root or the file's folder;
- in a Markdown file with numbered ``## N.`` headings, a bare ``section N``: a section of itself;
- any mention of the retired design file's name.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIPPED_DIRS = {
    ".git",
    ".venv",
    "venv",
    "build",
    "dist",
    "runs",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
}
# Spelled in two pieces so that this file does not mention it.
RETIRED = "DESIGN" + ".md"
# Files that may name retired files: the history of the project.
HISTORY = {"CHANGELOG.md"}
# Markdown files the programs write (e.g. `gali-ext study` writes study.md): names, not
# repository documents.
OUTPUT_NAMES = {"study.md", "paired.md"}

_PATH = r"(?<![\w./-])(?P<path>[\w][\w./-]*\.md)(?![\w-])"
_NUMBER = r"\d+(?:\.\d+)*"
_NUMBERS = rf"(?P<numbers>{_NUMBER}(?:(?:\s*,\s*|\s+and\s+|\s+or\s+){_NUMBER})*)"
_WORD = r"(?P<word>sections?|sec\.)"
# "docs/design.md, section 4", "`docs/design.md` sec. 5", "docs/design.md,\n    # section 6"
SECTION_AFTER = re.compile(rf"{_PATH}`*\)?,?[\s#*]*\b{_WORD}\s+{_NUMBERS}", re.IGNORECASE)
# "section 4 of docs/design.md"
SECTION_BEFORE = re.compile(rf"\b{_WORD}\s+{_NUMBERS}\s+of\s+(?:the\s+)?`*{_PATH}", re.IGNORECASE)
BARE_SECTION = re.compile(rf"\b{_WORD}\s+{_NUMBERS}", re.IGNORECASE)
LINK = re.compile(r"\]\(\s*<?(?P<target>[^)\s#>]+\.md)(?:#[^)\s>]*)?>?\s*\)")
BACKTICKED = re.compile(rf"`+{_PATH}`+")


def repository_files(root: Path = ROOT) -> set[str]:
    """Paths (relative, with ``/``) of the repository's files: tracked and not-ignored ones
    from git, or a walk of the folder when it is not a git checkout."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout.decode()
        names = [n for n in listed.split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = []
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
            names += [os.path.relpath(os.path.join(folder, f), root) for f in files]
    return {n.replace(os.sep, "/") for n in names if (root / n).is_file()}


def section_numbers(markdown: str) -> set[str]:
    """The section numbers a Markdown text defines: ``N`` for ``## N. Title``, ``N.M`` for
    ``### N.M Title`` (any deeper level)."""
    top = re.findall(r"^## (\d+)\.\s", markdown, re.MULTILINE)
    sub = re.findall(r"^#{3,6} (\d+(?:\.\d+)+)\.?\s", markdown, re.MULTILINE)
    return set(top) | set(sub)


def _resolve(candidate: str, folder: str, files: set[str], from_root: bool) -> str | None:
    """The repository path ``candidate`` names, relative to ``folder`` (and to the root when
    ``from_root``), or None when no such file exists."""
    bases = [folder, ""] if from_root else [folder]
    for base in bases:
        path = os.path.normpath(os.path.join(base, candidate)).replace(os.sep, "/")
        if path in files:
            return path
    return None


def check_references(
    path: str, text: str, files: set[str], read: Callable[[str], str]
) -> list[str]:
    """Problems with the Markdown references in ``text`` (the contents of repository file
    ``path``), each as ``"path:line: what is wrong"``. ``files`` are the repository's paths,
    ``read(path)`` returns a repository file's text."""
    folder = os.path.dirname(path)
    problems: set[tuple[int, str]] = set()

    def line_of(offset: int) -> int:
        return text.count("\n", 0, offset) + 1

    def numbers(match: re.Match) -> list[str]:
        found = re.findall(_NUMBER, match.group("numbers"))
        return found if match.group("word").lower() == "sections" else found[:1]

    def check_sections(target: str, wanted: list[str], offset: int, shown: str) -> None:
        defined = section_numbers(read(target))
        for number in wanted:
            if number not in defined:
                heading = f"## {number}." if "." not in number else f"### {number}"
                problems.add(
                    (line_of(offset), f"{shown} has no section {number} (no heading '{heading}')")
                )

    def check_path(candidate: str, offset: int, from_root: bool = True) -> str | None:
        target = _resolve(candidate, folder, files, from_root)
        if target is None:
            problems.add((line_of(offset), f"{candidate} does not exist in the repository"))
        return target

    section_spans = []
    for pattern in (SECTION_AFTER, SECTION_BEFORE):
        for match in pattern.finditer(text):
            section_spans.append(match.span())
            target = check_path(match.group("path"), match.start())
            if target is not None:
                check_sections(target, numbers(match), match.start(), match.group("path"))
    for match in LINK.finditer(text):
        if "://" not in match.group("target"):
            check_path(match.group("target"), match.start(), from_root=False)
    for match in BACKTICKED.finditer(text):
        if match.group("path") not in OUTPUT_NAMES:
            check_path(match.group("path"), match.start())
    if path.endswith(".md") and section_numbers(text):
        for match in BARE_SECTION.finditer(text):
            if not any(start <= match.start() < end for start, end in section_spans):
                check_sections(path, numbers(match), match.start(), f"{path} (itself)")
    if path not in HISTORY:
        for number, line in enumerate(text.splitlines(), start=1):
            if RETIRED in line:
                problems.add(
                    (
                        number,
                        f"mentions {RETIRED}, which is retired: cite docs/design.md, section N",
                    )
                )
    return [f"{path}:{line}: {what}" for line, what in sorted(problems)]


def _reader(root: Path = ROOT) -> Callable[[str], str]:
    cache: dict[str, str] = {}

    def read(path: str) -> str:
        if path not in cache:
            cache[path] = (root / path).read_text(encoding="utf-8")
        return cache[path]

    return read


def test_every_markdown_reference_points_at_an_existing_file_and_section():
    files = repository_files()
    read = _reader()
    scanned = sorted(f for f in files if f.endswith((".py", ".md")))
    assert "docs/design.md" in scanned and "gali_ext/losses.py" in scanned
    problems = [p for f in scanned for p in check_references(f, read(f), files, read)]
    assert problems == [], "broken references:\n" + "\n".join(problems)


def test_design_document_has_the_cited_sections_in_order():
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    assert re.findall(r"^## (.+)$", text, re.MULTILINE)[0] == "Architecture"  # read first
    titles = re.findall(r"^## (\d+)\. (.+)$", text, re.MULTILINE)
    assert [int(n) for n, _ in titles] == list(range(1, 12))
    assert [t for _, t in titles] == [
        "Variables, chains and the node language",
        "Presets and feedback providers",
        "Losses",
        "Discriminator head and training step",
        "Masks and mixed images",
        "Evaluation protocol",
        "The paper's numbers",
        "Data formats",
        "Drop-in for BigBiGAN-style projects",
        "Run directories and reliability",
        "GPU execution",
    ]


def test_checker_reports_missing_files_sections_and_the_retired_name():
    files = repository_files()
    read = _reader()
    design = "docs/design" + ".md"  # pieces, so that the scan of this file sees no references
    nope = "docs/nope" + ".md"
    text = "\n".join(
        [
            f"good: {design}, section 3",  # 1
            f"good, wrapped: see {design},",  # 2
            "    # sections 4 and 6.4",  # 3
            f"good: section 9 of {design}",  # 4
            f"bad section: {design}, section 42",  # 5
            f"bad subsection: section 3.9 of {design}",  # 6
            f"bad plural: {design}, sections 2 and 12",  # 7
            f"bad link: [a note]({nope})",  # 8
            f"bad path: ``{nope}``",  # 9
            f"retired: {RETIRED} section 1",  # 10
            f"good link and path: [readme](../README.md) `{design}`",  # 11
        ]
    )
    problems = check_references("tests/example.py", text, files, read)
    assert [p.split(":")[1] for p in problems] == ["5", "6", "7", "8", "9", "10", "10"]
    assert "section 42" in problems[0] and "'## 42.'" in problems[0]
    assert "section 3.9" in problems[1] and "'### 3.9'" in problems[1]
    assert "section 12" in problems[2] and "section 2 " not in problems[2]
    assert nope in problems[3] and nope in problems[4]
    assert any(RETIRED in p and "does not exist" in p for p in problems[5:])
    assert any("retired" in p for p in problems[5:])


def test_checker_resolves_links_from_the_linking_file_and_checks_its_own_sections():
    files = repository_files()
    read = _reader()
    # adapters/README.md links ../README.md; from the root the same link is broken
    assert check_references("adapters/NOTE.md", "[up](../README.md)", files, read) == []
    broken = check_references("NOTE.md", "[up](../README.md)", files, read)
    assert len(broken) == 1 and "../README.md does not exist" in broken[0]
    # a Markdown file with numbered sections: a bare "section N" is one of its own
    own = "## 1. One\n\nSee section 1 and section 2.\n"
    problems = check_references("docs/own.md", own, files, lambda p: own)
    assert problems == ["docs/own.md:3: docs/own.md (itself) has no section 2 (no heading '## 2.')"]


def test_repository_files_outside_git_walks_the_folder_and_skips_environments(tmp_path):
    for name in ("README.md", "docs/design.md", ".venv/lib/x.md", "build/y.md", "a.egg-info/z.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("text")
    assert repository_files(tmp_path) == {"README.md", "docs/design.md"}


def test_the_architecture_table_names_every_module_of_the_recipes_once():
    """docs/design.md's Architecture section gives each module of recipes/ its job: a module
    added, renamed or removed without the table is a newcomer's wrong map."""
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    section = text.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    named = [name for row in rows for name in re.findall(r"`(\w+)`", row)]
    modules = sorted(p.stem for p in (ROOT / "recipes").glob("*.py") if p.stem != "__init__")
    assert sorted(named) == modules


def test_the_architecture_diagram_names_every_module_of_the_core():
    """docs/design.md's Architecture section lists the core's modules by job: a module of
    gali_ext/ added or split without it is a newcomer's wrong map."""
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    section = text.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    core = section.split("gali_ext/", 1)[1].split("adapters/", 1)[0]
    named = {
        name
        for line in core.splitlines()[1:]
        for name in re.findall(r"\b([a-z_]+)\b", line.split(" .")[0].split("  ")[1])
    }
    modules = {p.stem for p in (ROOT / "gali_ext").glob("*.py") if p.stem != "__init__"}
    modules |= {p.name for p in (ROOT / "gali_ext").iterdir() if (p / "__init__.py").is_file()}
    assert modules - named == set(), "modules missing from the Architecture diagram"
