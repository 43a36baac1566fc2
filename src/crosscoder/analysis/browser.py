"""Headless Chromium checks of ``report.html`` (tests and the README screenshot).

Debian/Ubuntu: ``apt-get install -y chromium`` (binary ``/usr/bin/chromium``). The page is loaded from a
``file://`` URL with networking features off; :func:`check_page` dumps the DOM after the scripts ran
(errors are collected into ``#js-errors`` by the page's own hook) and scans Chromium's console log on
stderr; :func:`screenshot` writes a PNG.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import CrossCoderError

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
)


def find_chromium() -> str:
    for name in (
        os.environ.get("CHROMIUM"),
        "/usr/bin/chromium",
        "chromium",
        "chromium-browser",
        "google-chrome",
    ):
        if name and (Path(name).is_file() or shutil.which(name)):
            return shutil.which(name) or name
    raise CrossCoderError(
        "headless Chromium not found (Debian/Ubuntu: apt-get install -y chromium; or set CHROMIUM)"
    )


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="crosscoder-chromium-") as profile:
        cmd = [find_chromium(), *FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@dataclass
class PageCheck:
    dom: str  # the serialised DOM after the page's scripts ran
    status: str  # text of #status ("ready" once the table rendered)
    page_errors: list[str]  # lines written into #js-errors (script errors, console.error calls)
    console_errors: list[str]  # Chromium console log lines reporting uncaught errors or failed loads
    table_rows: int  # rows rendered in the latent table

    @property
    def ok(self) -> bool:
        return (
            self.status == "ready"
            and not self.page_errors
            and not self.console_errors
            and self.table_rows > 0
        )


CONSOLE_ERROR = re.compile(r"CONSOLE.*(Uncaught|Error|Failed to load|net::ERR)", re.I)


def check_page(html: str | Path, timeout: float = 60, budget_ms: int = 5000, anchor: str = "") -> PageCheck:
    """Load ``html`` (at ``#anchor`` when given) in headless Chromium and report what its scripts did."""
    url = Path(html).resolve().as_uri() + (f"#{anchor}" if anchor else "")
    proc = _run(
        ["--enable-logging=stderr", "--v=0", f"--virtual-time-budget={budget_ms}", "--dump-dom", url], timeout
    )
    dom = proc.stdout
    if proc.returncode != 0 and not dom:
        raise CrossCoderError(f"chromium failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    m = re.search(r"<div id=\"js-errors\"[^>]*>(.*?)</div>", dom, re.S)
    errors = [ln for ln in (m.group(1) if m else "").splitlines() if ln.strip()]
    st = re.search(r"<span id=\"status\">(.*?)</span>", dom)
    console = [ln for ln in proc.stderr.splitlines() if CONSOLE_ERROR.search(ln)]
    return PageCheck(
        dom=dom,
        status=st.group(1) if st else "",
        page_errors=errors,
        console_errors=console,
        table_rows=len(re.findall(r"<tr data-l=\"\d", dom)),
    )


def screenshot(
    html: str | Path,
    out: str | Path,
    width: int = 1400,
    height: int = 1600,
    anchor: str = "",
    timeout: float = 60,
) -> Path:
    """PNG of the page (scrolled to ``#anchor`` when given)."""
    url = Path(html).resolve().as_uri() + (f"#{anchor}" if anchor else "")
    out = Path(out).resolve()
    proc = _run(
        [f"--window-size={width},{height}", "--virtual-time-budget=5000", f"--screenshot={out}", url], timeout
    )
    if not out.is_file():
        raise CrossCoderError(
            f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr.strip()[-500:]}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m crosscoder.analysis.browser REPORT.html OUT.png [--table]``: check the page, then
    screenshot it (``--table``: the latent table with the first card open)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m crosscoder.analysis.browser", description=main.__doc__)
    p.add_argument("html")
    p.add_argument("png")
    p.add_argument("--table", action="store_true")
    p.add_argument("--size", type=int, nargs=2, default=(1400, 1600), metavar=("W", "H"))
    p.add_argument(
        "--anchor", default=None, help="open the page at #ANCHOR (e.g. q=ft_only: the table searched)"
    )
    a = p.parse_args(argv)
    anchor = a.anchor or ("table" if a.table else "")
    page = check_page(a.html, anchor=anchor)
    print(
        f"status {page.status!r}, {page.table_rows} table rows, page errors {page.page_errors}, "
        f"console errors {page.console_errors}"
    )
    screenshot(a.html, a.png, a.size[0], a.size[1], anchor=anchor)
    return 0 if page.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
