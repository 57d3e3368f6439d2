#!/usr/bin/env python3
"""Screenshot an HTML report with headless Chromium: ``screenshot_report.py REPORT.html OUT.png``.

Checks that the self-contained report renders in a real browser. Needs a Chromium binary
(Debian: ``apt-get install chromium``); exits 2 with a clear message when none is found.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome-headless-shell")
DEFAULT_WIDTH = 1100  # px: the report's 960 px column plus margins
DEFAULT_HEIGHT = 2400  # px: tall enough for the first sections and plots
DEFAULT_TIMEOUT = 120  # s: a cold Chromium start on a loaded 2-core machine


def find_browser() -> str | None:
    """The first Chromium-like binary on PATH, or $CHROMIUM if set."""
    env = os.environ.get("CHROMIUM")
    if env:
        return shutil.which(env) or (env if Path(env).is_file() else None)
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def screenshot(html: Path, out: Path, width: int = DEFAULT_WIDTH, height: int = DEFAULT_HEIGHT,
               browser: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> Path:  # fmt: skip
    browser = browser or find_browser()
    if browser is None:
        raise RuntimeError(f"no Chromium found (looked for {', '.join(BROWSERS)}; set $CHROMIUM to override)")
    html = html.resolve()
    if not html.is_file():
        raise RuntimeError(f"{html}: no such file")
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp.png"  # renamed over ``out`` once complete
    with tempfile.TemporaryDirectory(prefix="effilm-chromium-") as profile:
        cmd = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--hide-scrollbars", "--no-first-run", f"--user-data-dir={profile}",
            f"--window-size={width},{height}", f"--screenshot={tmp}", html.as_uri(),
        ]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0 or not tmp.is_file():
                tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
                raise RuntimeError(f"{browser} exited {proc.returncode} without a screenshot:\n{tail}")
            os.replace(tmp, out)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{browser} took more than {timeout:.0f} s") from None
        finally:
            tmp.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    ap.add_argument("html", type=Path, help="the report.html to render")
    ap.add_argument("out", type=Path, help="PNG to write")
    ap.add_argument("--width", type=int, default=DEFAULT_WIDTH, help="window width in px")
    ap.add_argument("--height", type=int, default=DEFAULT_HEIGHT, help="window height in px")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds before giving up")
    args = ap.parse_args(argv)
    try:
        path = screenshot(args.html, args.out, args.width, args.height, timeout=args.timeout)
    except RuntimeError as exc:
        print(f"screenshot_report: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
