"""Render a report page to PNG with headless Chromium (when it is installed), and check that
every picture on the page loaded."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from amnseg.errors import AmnsegError

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# No network, no first-run work: the page is self-contained.
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--virtual-time-budget=5000",
)


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def _run(browser: str, args: list[str], page: Path) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="amnseg_chromium_") as profile:
        return subprocess.run(
            [browser, *FLAGS, f"--user-data-dir={profile}", *args, page.resolve().as_uri()],
            capture_output=True, text=True, timeout=120, check=False,
        )


def _page_fact(page: Path, name: str, width: int = 1300) -> int:
    """A number the page records on <body> after its load event (data-<name>)."""
    browser = find_browser()
    if browser is None:
        raise AmnsegError("no Chromium found (install the Debian package 'chromium')")
    dom = _run(browser, [f"--window-size={width},900", "--dump-dom"], page).stdout
    found = re.search(rf'data-{name}="(\d+)"', dom)
    if found is None:
        raise AmnsegError(f"{page}: the page did not finish loading in Chromium")
    return int(found.group(1))


def broken_images(page: Path) -> int:
    """How many <img> of the page failed to load."""
    return _page_fact(page, "broken-images")


def screenshot(page: Path, png: Path, width: int = 1300, height: int | None = None) -> Path:
    """Render ``page`` to ``png``: the whole page (its measured height) unless ``height``."""
    browser = find_browser()
    if browser is None:
        raise AmnsegError("no Chromium found (install the Debian package 'chromium')")
    height = height or _page_fact(page, "page-height", width)
    png.parent.mkdir(parents=True, exist_ok=True)
    result = _run(browser, [f"--window-size={width},{height}", f"--screenshot={png.resolve()}"],
                  page)
    if not png.is_file():
        raise AmnsegError(f"{page}: Chromium wrote no screenshot ({result.stderr.strip()[-200:]})")
    return png
