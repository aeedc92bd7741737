#!/usr/bin/env python3
"""Open an evaluation report.html in headless Chromium and check that every <img> on it loaded.

    python scripts/check_report.py OUT/report.html [--screenshot shot.png] [--chromium /usr/bin/chromium]

The report carries a small script that, on window load, writes into `#image-check` how many images
decoded (`data-loaded`) out of how many there are (`data-total`). Chromium dumps the DOM after its virtual
time budget; this script reads those two numbers back. Exit code 0 when all images loaded, 1 when some did
not (or the page never ran its check), 2 when Chromium is missing or fails.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# Quiet, offline, throw-away profile: nothing is fetched, synced or kept between runs.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=5000"]


class _CheckFinder(HTMLParser):
    """Finds the attributes of the element with id="image-check"."""

    def __init__(self):
        super().__init__()
        self.attrs: dict[str, str] | None = None

    def handle_starttag(self, tag, attrs):
        found = dict(attrs)
        if found.get("id") == "image-check" and self.attrs is None:
            self.attrs = {k: v or "" for k, v in found.items()}


def parse_image_check(dom: str) -> tuple[int, int] | None:
    """(loaded, total) from a dumped DOM, or None if the page's check never ran."""
    finder = _CheckFinder()
    finder.feed(dom)
    attrs = finder.attrs
    if not attrs or "data-loaded" not in attrs or "data-total" not in attrs:
        return None
    return int(attrs["data-loaded"]), int(attrs["data-total"])


def run_chromium(report: Path, chromium: str = CHROMIUM, screenshot: Path | None = None, timeout: float = 60.0) -> str:
    """The DOM of `report` after load, as Chromium dumps it; optionally also a screenshot."""
    url = report.resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="check-report-") as profile:
        base = [chromium, *FLAGS, f"--user-data-dir={profile}"]
        dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=timeout, check=True).stdout
        if screenshot is not None:
            subprocess.run([*base, f"--screenshot={screenshot.resolve()}", "--window-size=1400,1800", url],
                           capture_output=True, text=True, timeout=timeout, check=True)
    return dom


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="report.html written by 'diffalign evaluate'")
    parser.add_argument("--screenshot", type=Path, default=None, help="also save a PNG screenshot of the page here")
    parser.add_argument("--chromium", default=CHROMIUM, help=f"Chromium binary (default {CHROMIUM})")
    args = parser.parse_args(argv)
    if not args.report.is_file():
        print(f"error: report '{args.report}' does not exist", file=sys.stderr)
        return 2
    if not Path(args.chromium).is_file():
        print(f"error: no Chromium at '{args.chromium}': install it (apt-get install chromium) or pass --chromium",
              file=sys.stderr)
        return 2
    try:
        dom = run_chromium(args.report, args.chromium, args.screenshot)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        detail = getattr(exc, "stderr", "") or ""
        print(f"error: Chromium failed on {args.report}: {exc}\n{detail[-2000:]}", file=sys.stderr)
        return 2
    counts = parse_image_check(dom)
    if counts is None:
        print(f"FAIL: {args.report}: the page's image check did not run (no data-loaded on #image-check)")
        return 1
    loaded, total = counts
    ok = total > 0 and loaded == total
    print(f"{'OK' if ok else 'FAIL'}: {loaded} of {total} images loaded in {args.report}"
          + (f"; screenshot {args.screenshot}" if args.screenshot else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
