"""The documentation site builds in strict mode (a warning or a broken link fails it), its generated
pages hold what they promise, and the start page, the API page of `emulate.run` and the gallery
render in a headless browser with no request leaving the machine."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("mkdocs", "material", "mkdocstrings_handlers.python")


def _missing() -> list[str]:
    missing = []
    for name in TOOLS:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(name)
    return missing


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    missing = _missing()
    if missing:
        pytest.skip(f"the docs tools are not installed ({', '.join(missing)}): pip install -e '.[docs]' "
                    "(make test and make docs install them)")
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert not (ROOT / "docs" / "cli.md").exists(), "the CLI reference is generated into the site, never into docs/"
    return out


def test_the_site_builds_strict_with_every_page(site):
    for page in ("index", "api", "cli", "usage", "python", "models", "cluster", "extending", "design", "architecture",
                 "numerics", "planner", "paper", "theorems", "benchmarks", "security", "gallery", "limits"):
        assert (site / f"{page}.html").is_file(), page
    for picture in re.findall(r'src="(gallery/[^"]+)"', (site / "gallery.html").read_text(encoding="utf-8")):
        assert (site / picture).is_file(), picture


def test_the_api_page_is_generated_from_the_docstrings(site):
    page = (site / "api.html").read_text(encoding="utf-8")
    for name in ("emulate.api.run", "emulate.api.stream", "emulate.api.compile", "emulate.api.monolithic",
                 "emulate.problem.prepare", "emulate.runtime.contract.AttentionOracle",
                 "emulate.runtime.contract.Executor", "emulate.runtime.contract.PairCall",
                 "emulate.runtime.registry.register_oracle", "emulate.runtime.registry.register_executor",
                 "emulate.runtime.oracles.KernelOracle", "emulate.runtime.oracles.PaperOracle",
                 "emulate.runtime.local.Local", "cluster.options.Ray", "emulate.pictures.draw"):
        assert f'id="{name}"' in page, name
    assert "Run one emulated forward end to end" in page  # run's docstring


def test_the_cli_page_is_every_commands_help(site):
    from emulate.cli.program import build_parser

    page = (site / "cli.html").read_text(encoding="utf-8")
    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    for name in commands:
        assert f"emulate {name}" in page, name
    for option in ("--block-size", "--attention", "--executor", "--quiet", "--shape", "--max-tokens", "--worker-nodes"):
        assert option in page, option


def test_the_pages_load_nothing_from_elsewhere(site):
    """Stylesheets, scripts, pictures and fonts are the site's own (the theme's Google Fonts are off)."""
    for page in site.glob("*.html"):
        text = page.read_text(encoding="utf-8")
        loads = re.findall(r'<(?:script|img|source|iframe)\b[^>]*\bsrc="([^"]+)"', text)
        loads += re.findall(r'<link\b[^>]*\bhref="([^"]+)"', text)
        assert not [url for url in loads if re.match(r"(https?:)?//", url)], page.name


# --------------------------------------------------------------------------------------------
# the built site in a headless browser (as tests/test_draw_graph.py does for its HTML page)

def _browser():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _chromium(args, profile, timeout=90):
    exe = _browser()
    if exe is None:
        pytest.skip("no chromium: install Debian's `chromium` package (apt-get install chromium) to run the browser check")
    # every host name resolves to nothing: a request that tried to leave the machine would fail
    cmd = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions",
           "--host-resolver-rules=MAP * ~NOTFOUND", "--disable-background-networking",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _text(dom: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", dom))  # code is split into spans: join it back


@pytest.mark.parametrize("page, wants", [
    ("index.html", ["Getting started", "make run", "emulate.run"]),
    ("api.html", ["emulate.api.run", "Run one emulated forward end to end", "block_size"]),
    ("gallery.html", ["Gallery", "emulate graph --random-tokens 1024"]),
])
def test_the_pages_render_in_a_headless_browser(site, tmp_path, page, wants):
    out = _chromium(["--dump-dom", (site / page).as_uri()], tmp_path / "profile")
    assert out.returncode == 0, out.stderr[-2000:]
    text = _text(out.stdout)
    for want in wants:
        assert want in text, want
    assert 'class="md-header' in out.stdout  # the theme's layout, not a bare page


def test_the_start_page_is_drawn(site, tmp_path):
    from matplotlib.image import imread

    shot = tmp_path / "shot.png"
    out = _chromium([f"--screenshot={shot}", "--window-size=1200,800", "--hide-scrollbars",
                     (site / "index.html").as_uri()], tmp_path / "profile")
    assert shot.exists(), out.stderr[-2000:]
    img = imread(shot)[..., :3].astype(float)
    assert img.shape[:2] == (800, 1200)
    assert img.std() > 0.05, "blank page"
    assert (img.max(axis=-1) - img.min(axis=-1) > 0.2).mean() > 0.005, "no colour: the theme's header is missing"
