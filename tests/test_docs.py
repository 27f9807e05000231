"""The README and docs/ cannot drift from the kit: links resolve, code shown from a file still is
in that file, code meant to run still runs, and every file, scenario, flag and test they name
exists.

A code block is checked when an HTML comment stands on the line before its fence:
  <!-- source: FILE -->      every non-blank line of the block is a line of FILE, in order
  <!-- runs -->             a python block that runs as it is (no database)
  <!-- runs: database -->   a python block that runs against the test database (slow)
"""

import re
import subprocess
import sys

import pytest
from conftest import ROOT, kit_env

from kit.scenarios import BY_NAME

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"<!-- (source: \S+|runs(?:: database)?) -->\n[ \t]*```(\w*)\n(.*?)\n[ \t]*```",
                   re.S)


def blocks(kind: str):
    for page in PAGES:
        for mark, _lang, body in BLOCK.findall(page.read_text()):
            if mark.split(":")[0] == kind:
                yield page.relative_to(ROOT), mark, body


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def test_the_readme_is_a_front_door_of_at_most_250_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if "://" in target:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists() or (anchor and anchor not in anchors(file)):
                broken.append(f"{page.name}: {target}")
    assert not broken, broken


def test_the_checklist_links_into_docs():
    readme = (ROOT / "README.md").read_text()
    checklist = readme.split("## Fix your app")[1].split("\n## ")[0]
    items = re.findall(r"^\d+\. .*?(?=^\d+\. |\Z)", checklist, re.M | re.S)
    assert len(items) >= 8
    assert all("](docs/" in item for item in items), [i[:60] for i in items]


def test_code_shown_from_a_file_is_still_in_that_file():
    stale = []
    for page, mark, body in blocks("source"):
        source = [line.strip() for line in (ROOT / mark.split(": ")[1]).read_text().splitlines()]
        at = 0
        for line in filter(None, (line.strip() for line in body.splitlines())):
            try:
                at = source.index(line, at) + 1
            except ValueError:
                stale.append(f"{page} ({mark}): {line}")
                break
    assert not stale, stale
    assert len(list(blocks("source"))) >= 5


def run_block(body: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", body], cwd=ROOT, env=kit_env(**env),
                          capture_output=True, text=True, timeout=60)


def test_code_meant_to_run_runs():
    ran = [(page, run_block(body)) for page, mark, body in blocks("runs") if mark == "runs"]
    assert ran and all(done.returncode == 0 for _, done in ran), [
        (str(page), done.stderr[-500:]) for page, done in ran if done.returncode]


@pytest.mark.slow
def test_code_meant_to_run_against_a_database_runs(database_url):
    ran = [(page, run_block(body, DATABASE_URL=database_url))
           for page, mark, body in blocks("runs") if mark == "runs: database"]
    assert ran and all(done.returncode == 0 for _, done in ran), [
        (str(page), done.stderr[-500:]) for page, done in ran if done.returncode]


def test_every_file_scenario_flag_and_test_named_exists():
    text = "\n".join(page.read_text() for page in PAGES)
    missing = [path for path in set(re.findall(
        r"`((?:kit|bench|tests|examples|docs)/[\w./-]+\.(?:py|json|png|md|conf\.py))", text))
        if not (ROOT / path).exists()]
    missing += [f"python -m {m}" for m in set(re.findall(r"python -m (kit\.\w+)", text))
                if not (ROOT / (m.replace(".", "/") + ".py")).exists()]
    missing += [f"--scenario {name}" for name in set(re.findall(r"--scenario ([a-z][\w-]*)", text))
                if name not in BY_NAME]
    flags = (ROOT / "run_all.sh").read_text()
    missing += [flag for flag in set(re.findall(r"\./run_all\.sh (--[\w-]+)", text))
                if f"{flag})" not in flags and f"|{flag}" not in flags and f"{flag}|" not in flags]
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    missing += [name for name in set(re.findall(r"`(test_\w+)`", text))
                if f"def {name}(" not in tests]
    assert not missing, sorted(missing)


def test_the_stream_row_fields_documented_are_the_fields_written():
    """docs/stream.md's "A stream row in the JSON" names every field kit.stream.judge writes,
    and no other."""
    import test_open_loop

    from kit import stream
    page = (ROOT / "docs" / "stream.md").read_text()
    section = page.split("### A stream row in the JSON", 1)[1].split("\n#", 1)[0]
    named = {word for word in re.findall(r"`(\w+)`", section)}
    row = stream.judge(BY_NAME["sync"], test_open_loop.stream_part(0.007, 0.3))
    assert named == set(row), (named - set(row), set(row) - named)
