"""The docs stay a guide: README.md leads to every page, links resolve, commands paste into a fresh shell.

- Every page in docs/ is linked from README.md and opens (after its title) with who it is for.
- Every relative link in README.md, docs/*.md, vae/README.md and BENCHMARKS.md points at an
  existing file, and a ``#anchor`` at a heading of that file (GitHub's heading slugs).
- Commands work when pasted into a fresh shell in the checkout, with no virtual environment
  activated: no code line starts with a bare ``python``, ``pip``, ``pytest``, ``prefect``,
  ``mlflow``, ``optuna-dashboard`` or console script; they go through ``make`` or ``.venv/bin/``.
- README.md lists every make target that has a help text and every console script's module, and
  stays under 150 lines; docs/configuration.md lists every variable vae/settings.py reads, and
  docs/library.md every form of the fast path (vae.fast.FORMS and the heap).
(The code blocks themselves run in tests/vae/test_readme_snippets.py, the shell commands of README.md,
docs/tuning.md and docs/pipelines.md in tests/test_commands.py.)
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS, REPO / "vae" / "README.md", REPO / "BENCHMARKS.md"]
BARE = {"python", "python3", "pip", "pip3", "pytest", "prefect", "mlflow", "optuna-dashboard", "vae-train",
        "vae-sample", "vae-evaluate", "vae-export", "vae-pipeline", "vae-compare", "vae-tune"}
_FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$")


def _name(path: Path) -> str:
    return str(path.relative_to(REPO))


def _prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return _FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    """The anchors of a page's headings (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", _prose(path.read_text()), re.MULTILINE):
        slug = _slug(heading)
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / target.split("#")[0]).resolve() for target in _LINK.findall(_prose(README.read_text()))}
    assert DOCS, "docs/ holds no pages"
    assert [_name(p) for p in DOCS if p.resolve() not in linked] == []


@pytest.mark.parametrize("page", DOCS, ids=_name)
def test_every_docs_page_opens_with_who_it_is_for(page):
    lines = [ln for ln in page.read_text().splitlines() if ln.strip()]
    assert lines[0].startswith("# "), f"{_name(page)}: no title"
    assert lines[1].startswith("For "), f"{_name(page)}: the first line after the title says who it is for"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_relative_link_points_at_an_existing_file_and_heading(page):
    broken = []
    for target in _LINK.findall(_prose(page.read_text())):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.name}")
    assert broken == [], f"{_name(page)}: " + "; ".join(broken)


def _commands(code: str) -> list[str]:
    """The commands of a shell block: continuations joined, comments dropped, split at && ; || |."""
    code = code.replace("\\\n", " ")
    out = []
    for line in code.splitlines():
        line = line.split(" #")[0] if not line.lstrip().startswith("#") else ""
        out += [part.strip() for part in re.split(r"&&|\|\||;|\|", line) if part.strip()]
    return out


def _program(command: str) -> str:
    """The program a command runs, past leading VAR=value assignments."""
    words = command.split()
    while words and _ASSIGNMENT.match(words[0]):
        words = words[1:]
    return words[0] if words else ""


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_commands_run_through_make_or_the_checkouts_venv(page):
    text = page.read_text()
    bad = [c for lang, code in _FENCE.findall(text) if lang in ("bash", "sh", "")
           for c in _commands(code) if _program(c) in BARE]
    # Inline code that reads as a command: a bare `python ...`, or a bare tool given flags.
    for span in re.findall(r"`([^`]+)`", _prose(text)):
        span = " ".join(span.split())  # a span may wrap onto the next line
        program = _program(span)
        if program in BARE and len(span.split()) > 1 and (program.startswith("python") or " -" in span):
            bad.append(span)
    assert bad == [], f"{_name(page)}: use `make ...` or `.venv/bin/...` instead of: {bad}"


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 150


def test_readme_lists_every_make_target_and_console_script():
    text = README.read_text()
    targets = re.findall(r"^([a-z][\w-]*):[^#\n]*## ", (REPO / "Makefile").read_text(), re.MULTILINE)
    scripts = (REPO / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    modules = {m.removesuffix(".__main__") for m in re.findall(r'^[\w-]+ = "([\w.]+):', scripts, re.MULTILINE)}
    assert targets and [t for t in targets if f"make {t}" not in text] == []
    assert modules
    assert [m for m in sorted(modules) if f"-m {m}`" not in text] == []


def test_configuration_page_lists_every_vae_variable():
    from vae import settings

    documented = set(re.findall(r"^``(VAE_\w+)``", settings.__doc__, re.MULTILINE))
    table = set(re.findall(r"^\| `(VAE_\w+)` \|", (REPO / "docs" / "configuration.md").read_text(), re.MULTILINE))
    assert documented and table == documented


def test_library_page_shows_every_form_of_the_fast_path():
    from vae import fast

    text = (REPO / "docs" / "library.md").read_text()
    section = text[text.index("\n## The fast path\n"):]
    rows = re.findall(r"^\| `(\w+)` \|", section[:section.index("\n## ", 1)], re.MULTILINE)
    assert rows == [*fast.FORMS, "heap"]
