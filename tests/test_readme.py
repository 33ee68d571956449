"""The README's Python example runs as written, the pytest example docs/python.md shows is the one
the suite runs, and the README stays the short page a newcomer reads first."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def section(title: str, page: str = "README.md") -> str:
    text = (ROOT / page).read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def test_the_use_from_python_example_is_short_and_run_by_the_suite():
    """tests/test_doc_examples.py runs it (every python block of the README and docs/ that is not marked)."""
    from test_doc_examples import BLOCKS

    first = re.search(r"```python\n(.*?)```", section("Use from Python"), re.S).group(1)
    assert len(first.strip().splitlines()) <= 10
    assert any(code == first and reason is None for _, _, code, reason in BLOCKS)


def test_the_python_page_shows_the_pytest_example_the_suite_runs():
    example = (ROOT / "examples" / "test_in_your_suite.py").read_text(encoding="utf-8")
    assert example in section("Local mode in your own tests", "docs/python.md")


def test_the_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+:", target):
            assert (ROOT / target).exists(), target


def test_the_make_run_sample_is_the_default_runs_problem():
    """The sample's input and graph lines are what the default run compiles (nothing runs here)."""
    import emulate

    sample = re.search(r"```\n(model .*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S).group(1)
    graph = emulate.compile("smollm2-135m", block_size=256, compact=True)
    counts = graph.counts()
    assert f"N = {graph.spec.tokens} tokens in B = {-(-graph.spec.tokens // 256)} blocks of M = 256" in sample
    assert f"{counts['attention_calls']} attention calls" in sample
