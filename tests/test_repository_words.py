"""The repository speaks of the product: no work-log words in any tracked text file.

Code, comments, tests, docs, result files and their names describe osqdeploy, not the process
that built it: no "session", "issue N", "lent", "previous engine" or "GPU machine".
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()  # holds the patterns themselves

# pytest's own name for a fixture that lives for the whole test run
API_TERMS = re.compile(r'scope="session"')
FORBIDDEN = re.compile(
    r"\bsessions?\b|\bissues? ?#?\d+|\blent\b|previous engine|GPU machine",
    re.IGNORECASE,
)


def tracked_files() -> list[str]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True, timeout=60
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.fail(f"git ls-files failed in {ROOT}: {e}")
    return [name for name in out.decode().split("\0") if name and name != THIS]


def text_of(path: Path) -> str | None:
    """The file's text, or None for a binary file (a NUL byte or not UTF-8)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def word_hits(names: list[str]) -> list[str]:
    """``file:line: match`` for each forbidden word in the named files and in the names themselves."""
    hits = []
    for name in names:
        hits += [f"{name}: file name contains {m.group(0)!r}" for m in FORBIDDEN.finditer(name)]
        path = ROOT / name
        if not path.is_file():  # deleted in the working tree, not yet in the index
            continue
        text = text_of(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            hits += [f"{name}:{number}: {m.group(0)!r}" for m in FORBIDDEN.finditer(API_TERMS.sub("", line))]
    return hits


def test_patterns_catch_the_words_and_spare_their_neighbours() -> None:
    caught = ["a Session 8 run", "sessions", "see issue 21", "issue #5", "Issues 3", "H200 lent for H100",
              "the previous engine", "the GPU machine's CPU"]
    spared = ["possession", "lenticular", "issued", "an issue with", "silent", "engine", "GPU"]
    assert all(FORBIDDEN.search(text) for text in caught)
    assert not any(FORBIDDEN.search(text) for text in spared)


def test_tracked_text_files_hold_no_work_log_words() -> None:
    names = tracked_files()
    assert names, "git ls-files listed nothing"
    hits = word_hits(names)
    assert not hits, f"{len(hits)} work-log words in tracked files:\n" + "\n".join(hits)
