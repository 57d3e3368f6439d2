#!/usr/bin/env python3
"""Screenshot an HTML report with headless Chromium: ``screenshot_report.py REPORT.html OUT.png``.

Checks that the self-contained report renders in a real browser. Needs a Chromium binary
(Debian: ``apt-get install chromium``); exits 2 with a clear message when none is found.
``--check-images`` also loads the page once more and exits 1 unless every ``<img>`` loaded
(natural width > 0), printing each image's natural width.
"""

from __future__ import annotations

import argparse
import html as html_lib
import json
import os
import re
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


def _flags(profile: str) -> list[str]:
    return ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
            "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}"]  # fmt: skip


PROBE = ("<script>window.addEventListener('load', () => document.body.setAttribute('data-image-widths', "
         "JSON.stringify(Array.from(document.images, i => i.naturalWidth))));</script>")  # fmt: skip


def image_widths(html: Path, browser: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> list[int]:
    """The natural width of every ``<img>`` of ``html`` once the page has loaded in Chromium (0: the
    image did not load). The page is loaded from a copy beside it, so relative links resolve as
    they do for the report itself, whatever the working directory."""
    browser = browser or find_browser()
    if browser is None:
        raise RuntimeError(f"no Chromium found (looked for {', '.join(BROWSERS)}; set $CHROMIUM to override)")
    html = html.resolve()
    page = html.read_text(encoding="utf-8")
    if "</body>" not in page:
        raise RuntimeError(f"{html}: no </body>")
    probe = html.parent / f".{html.stem}.{os.getpid()}.probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>", 1), encoding="utf-8")
    try:
        with tempfile.TemporaryDirectory(prefix="effilm-chromium-") as profile:
            cmd = [browser, *_flags(profile), "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{browser} took more than {timeout:.0f} s") from None
    finally:
        probe.unlink(missing_ok=True)
    m = re.search(r'data-image-widths="([^"]*)"', proc.stdout)
    if proc.returncode != 0 or m is None:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"{browser} exited {proc.returncode} without the page's image widths:\n{tail}")
    return [int(w) for w in json.loads(html_lib.unescape(m.group(1)))]


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
        cmd = [browser, *_flags(profile), f"--window-size={width},{height}", f"--screenshot={tmp}", html.as_uri()]
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
    ap.add_argument("--check-images", action="store_true", help="exit 1 unless every <img> loads (natural width > 0)")
    args = ap.parse_args(argv)
    try:
        path = screenshot(args.html, args.out, args.width, args.height, timeout=args.timeout)
        widths = image_widths(args.html, timeout=args.timeout) if args.check_images else None
    except RuntimeError as exc:
        print(f"screenshot_report: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    if widths is not None:
        print(f"images: {len(widths)}, natural widths {widths}")
        if not all(widths):
            print(f"screenshot_report: {widths.count(0)} image(s) did not load", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
