"""The README's Python example runs as written, and the pytest example it shows is the one the suite runs."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def test_the_use_from_python_example_runs():
    first = re.search(r"```python\n(.*?)```", section("Use from Python"), re.S).group(1)
    exec(compile(first, "README.md: Use from Python", "exec"), {})


def test_the_readme_shows_the_pytest_example_the_suite_runs():
    example = (ROOT / "examples" / "test_in_your_suite.py").read_text(encoding="utf-8")
    assert example in section("Use from Python")
