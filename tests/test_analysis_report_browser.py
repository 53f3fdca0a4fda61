"""The HTML report opened in headless Chromium: the figures decode and render, the tables are there.

Two checks, because a screenshot alone cannot tell a missing table row from a layout change: a
screenshot must show the figures' line colours and the table styling, and the DOM that Chromium
builds (with a probe script added to a *copy* of the report) must list every embedded image as
decoded at its real size. A copy with one image's data corrupted is the negative control.
"""
from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from megacov.analysis.runs import read_run
from megacov.analysis.summary import AnalysisOptions, analyze_run
from megacov.analysis.synthetic import write_demo_runs

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get update && apt-get install -y chromium)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROBE = ("<script>window.addEventListener('load', () => {document.body.setAttribute('data-probe', "
         "Array.from(document.images).map(i => i.complete ? i.naturalWidth : -1).join(','));});</script>")
# matplotlib's first three cycle colours: the three runs' lines and markers.
RUN_COLOURS = {"C0": (31, 119, 180), "C1": (255, 127, 14), "C2": (44, 160, 44)}
TABLE_HEADER = (238, 238, 255)  # th background in the report's CSS


def _chromium(tmp_path, *args: str, name: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{name}"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=180, check=False)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from megacov.analysis.report import write_report

    base = tmp_path_factory.mktemp("runs")
    analyses = [analyze_run(read_run(d), AnalysisOptions()) for d in write_demo_runs(str(base))]
    path, figures = write_report(analyses, str(base / "analysis"))
    return path, figures, analyses


def _rgb(png_path: str) -> np.ndarray:
    import matplotlib.image as mpimg

    img = mpimg.imread(png_path)
    return np.round(img[..., :3] * 255).astype(np.int16)


def _count_colour(img: np.ndarray, rgb, tol: int = 12) -> int:
    return int(np.all(np.abs(img - np.array(rgb)) <= tol, axis=-1).sum())


def test_screenshot_shows_figures_and_table(report, tmp_path):
    path, _, _ = report
    shot = tmp_path / "shot.png"
    proc = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", f"file://{path}",
                     name="shot")
    assert shot.exists(), proc.stderr[-2000:]
    img = _rgb(str(shot))
    assert img.shape[:2] == (2000, 1200)
    non_white = float(np.mean(np.any(img < 245, axis=-1)))
    assert non_white > 0.05, f"page is nearly blank ({non_white:.3f} non-white)"
    for name, rgb in RUN_COLOURS.items():
        assert _count_colour(img, rgb) > 300, f"no {name} pixels: figures did not render"
    assert _count_colour(img, TABLE_HEADER, tol=3) > 1000, "table header not rendered"


def _dump_dom(tmp_path, html_text: str, name: str) -> str:
    page = tmp_path / f"{name}.html"
    page.write_text(html_text.replace("</body>", PROBE + "</body>"))
    proc = _chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", f"file://{page}", name=name)
    assert "data-probe" in proc.stdout, proc.stderr[-2000:]
    return proc.stdout


def test_every_embedded_image_decodes_and_tables_hold_the_numbers(report, tmp_path):
    path, figures, analyses = report
    with open(path, encoding="utf-8") as fh:
        html_text = fh.read()
    dom = _dump_dom(tmp_path, html_text, "ok")
    widths = [int(w) for w in re.search(r'data-probe="([^"]*)"', dom).group(1).split(",")]
    expected = [_rgb(p).shape[1] for p in figures.values()]
    assert widths == expected  # each image decoded at its PNG's real width
    assert dom.count("<table") >= 1 + 3  # comparison table + per-run phase tables
    comparison = re.search(r'<table class="comparison">.*?</table>', dom, re.DOTALL).group(0)
    for res in analyses:
        assert f"<th>{res.run.name}</th>" in comparison
        assert f"<td>{res.fit.ceiling:.4g}</td>" in comparison


def test_negative_control_corrupted_image_is_detected(report, tmp_path):
    path, figures, _ = report
    with open(path, encoding="utf-8") as fh:
        html_text = fh.read()
    broken = re.sub(r"(data:image/png;base64,)[A-Za-z0-9+/=]{200}", r"\1AAAA", html_text, count=1)
    assert broken != html_text
    dom = _dump_dom(tmp_path, broken, "broken")
    widths = [int(w) for w in re.search(r'data-probe="([^"]*)"', dom).group(1).split(",")]
    assert widths[0] <= 0 and all(w > 0 for w in widths[1:]) and len(widths) == len(figures)
