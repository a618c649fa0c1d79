"""The report in a real headless browser (Chromium): the page loads, every image decodes, no section is empty."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_report import make_run

from unifit.report.report import build_report

# Runs inside the page after its load event (which waits for every image): what a reader would see.
CHECK = """<script>
window.addEventListener('load', () => {
  const images = [...document.images].map(img => ({src: img.getAttribute('src'), ok: img.complete && img.naturalWidth > 0}));
  const sections = [...document.querySelectorAll('h2')].map(h => {
    let content = 0;
    for (let el = h.nextElementSibling; el && el.tagName !== 'H2'; el = el.nextElementSibling) {
      if (el.tagName === 'SCRIPT' || el.id === 'check') continue;
      if (el.textContent.trim() || el.querySelector('img')) content += 1;
    }
    return {heading: h.textContent, content};
  });
  const out = document.createElement('pre');
  out.id = 'check';
  out.textContent = JSON.stringify({title: document.title, images, sections, details: document.querySelectorAll('details').length});
  document.body.appendChild(out);
});
</script>"""


def _chromium() -> str | None:
    return next((found for name in ("chromium", "chromium-browser", "google-chrome") if (found := shutil.which(name))), None)


def _render(browser: str, out: Path, profile: Path) -> dict:
    """Load report.html (with CHECK appended) in headless Chromium and return what CHECK found."""
    page = out / "check.html"
    page.write_text((out / "report.html").read_text().replace("</body>", CHECK + "</body>"))
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=10000",
               "--dump-dom", page.as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    found = re.search(r'<pre id="check">(.*?)</pre>', result.stdout, re.DOTALL)
    assert found, f"the page did not finish loading in chromium (rc {result.returncode}): {result.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def test_report_renders_in_chromium(tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed; CI must install the Debian package `chromium` for this test")
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); CI runs this test")
    runs = [make_run(tmp_path, "demo")]
    out = tmp_path / "report"
    build_report(runs, out)
    report = _render(browser, out, tmp_path / "profile")
    assert report["title"].startswith("UNIFIT report")
    assert len(report["images"]) == 5 and all(image["ok"] for image in report["images"]), report["images"]
    assert report["sections"] and all(section["content"] > 0 for section in report["sections"]), report["sections"]
    assert report["sections"][1]["heading"] == "Figure 4 — judge win rate"  # results lead, right after the run overview
    assert report["details"] == 2  # the raw generate and select counters are folded away


def test_a_broken_image_is_caught(tmp_path: Path) -> None:
    """The check itself can fail: a report whose image file is missing is reported as not decoded."""
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed")
    out = tmp_path / "report"
    build_report([make_run(tmp_path, "demo")], out)
    (out / "win_rates.png").write_bytes(b"not a png")
    report = _render(browser, out, tmp_path / "profile")
    assert [image["src"] for image in report["images"] if not image["ok"]] == ["win_rates.png"]
