"""Every ```python block of README.md and docs/*.md runs, each in a fresh namespace in this process,
so the examples cannot rot.

The convention: a block runs unless the line before it (blank lines aside) is an HTML comment
`<!-- not run: REASON -->`, which the page shows to no one; the reason is required (a path to a
checkpoint of the reader's own, a Ray cluster, a run too long for the suite). A block is run once
however many pages show it. Blocks run in a temporary directory, and what they register
(emulate.register_oracle, register_executor) is taken back afterwards.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)
SKIP = re.compile(r"<!--\s*not run:\s*(.*?)\s*-->\s*$", re.S)


def blocks():
    """(page, line, code, reason not to run or None) for every python block, the first of duplicates."""
    seen = set()
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            before = text[:match.start()].rstrip()
            skip = SKIP.search(before[before.rfind("\n") + 1:] if "\n" in before else before)
            code = match.group(1)
            if code in seen:
                continue
            seen.add(code)
            line = text.count("\n", 0, match.start()) + 1
            yield page.relative_to(ROOT).as_posix(), line, code, (skip.group(1) if skip else None)


BLOCKS = list(blocks())


def test_the_pages_have_python_blocks_and_every_skip_says_why():
    assert len(BLOCKS) >= 8
    for page, line, _, reason in BLOCKS:
        assert reason is None or reason.strip(), f"{page}:{line}: `<!-- not run: -->` needs its reason"


@pytest.mark.parametrize("page, line, code, reason", BLOCKS, ids=[f"{p}:{n}" for p, n, _, _ in BLOCKS])
def test_the_block_runs(page, line, code, reason, tmp_path, monkeypatch):
    if reason is not None:
        pytest.skip(f"not run: {reason}")
    from emulate.runtime.registry import EXECUTORS, ORACLES

    saved = {registry: dict(registry._entries) for registry in (ORACLES, EXECUTORS)}
    monkeypatch.chdir(tmp_path)
    try:
        exec(compile(code, f"{page}:{line}", "exec"), {"__name__": "__doc_example__"})
    finally:
        for registry, entries in saved.items():
            registry._entries.clear()
            registry._entries.update(entries)
