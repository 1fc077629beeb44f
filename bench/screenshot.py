"""A picture of a leaderboard page as a reader sees it: ``leaderboard.html`` rendered to PNG.

A headless Chromium (``chromium``, ``chromium-browser``, ``google-chrome``) takes the screenshot where
one is installed: the page as a browser lays it out, its script included. Without one, WeasyPrint
(an HTML/CSS layout engine, no JavaScript) lays it out on one tall page and pdfium rasterises it:
the table, notes and embedded pictures as laid out by CSS, not the click-to-sort script. Neither is
a dependency of the project::

    pip install weasyprint pypdfium2      # only for the fallback
    python bench/screenshot.py bench/results/digits-compare-ipc1-mts/leaderboard.html \\
        --out bench/results/digits-compare-ipc1-mts/leaderboard-screenshot.png

It prints which renderer it used, the picture's size, and what it checked in the page (the table's
rows and columns, the pictures embedded), as a table and as JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

WIDTH = 1800
"""Viewport width in CSS pixels: the whole table fits without wrapping."""
TALL = 20000
"""The fallback's page height in CSS pixels, more than a leaderboard needs."""
MARGIN = 24
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def with_browser(browser: str, page: Path, out: Path, height: int) -> None:
    subprocess.run(
        [
            browser,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            f"--window-size={WIDTH},{height}",
            f"--screenshot={out}",
            page.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def with_weasyprint(page: Path, out: Path) -> None:
    import pypdfium2
    import weasyprint
    from PIL import Image, ImageChops

    # One page as wide as the viewport and taller than any leaderboard (a browser scrolls; pages
    # would break before each picture that does not fit), cut below the last content.
    size = weasyprint.CSS(string=f"@page {{ size: {WIDTH}px {TALL}px; margin: 0 }}")
    with tempfile.TemporaryDirectory() as folder:
        pdf = Path(folder) / "page.pdf"
        weasyprint.HTML(filename=str(page)).write_pdf(pdf, stylesheets=[size])
        document = pypdfium2.PdfDocument(str(pdf))
        whole = document[0].render(scale=96 / 72).to_pil().convert("RGB")  # PDF points to CSS pixels
        document.close()
    blank = Image.new("RGB", whole.size, "white")
    bottom = ImageChops.difference(whole, blank).getbbox()[3]
    whole.crop((0, 0, WIDTH, min(whole.height, bottom + MARGIN))).save(out)


def contents(page: Path) -> dict[str, int]:
    """What the page holds, counted from its HTML: table rows and columns, embedded pictures."""
    html = page.read_text()
    return {
        "columns": len(re.findall(r"<th\b", html)),
        "rows": len(re.findall(r"<tr\b", html)) - 1,
        "embedded_pictures": len(re.findall(r"src='data:image/png;base64,", html)),
        "external_references": len(re.findall(r"(?:src|href)=['\"](?!data:)[^'\"]+", html)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="a leaderboard.html written by condense compare")
    parser.add_argument("--out", type=Path, help="PNG to write (default: beside the page)")
    parser.add_argument("--height", type=int, default=3000, help="browser window height in CSS pixels")
    args = parser.parse_args()
    if not args.page.is_file():
        sys.exit(f"error: {args.page} is not a file")
    out = args.out or args.page.with_name("leaderboard-screenshot.png")
    browser = next((b for b in BROWSERS if shutil.which(b)), None)
    if browser:
        with_browser(browser, args.page, out, args.height)
        renderer = f"{browser} --headless"
    else:
        try:
            with_weasyprint(args.page, out)
        except ImportError:
            sys.exit("error: no headless Chromium here; for the fallback, pip install weasyprint pypdfium2")
        renderer = "weasyprint + pdfium (no browser found; no JavaScript)"
    from PIL import Image

    with Image.open(out) as picture:
        size = picture.size
    result = {"page": str(args.page), "screenshot": str(out), "renderer": renderer, "pixels": size}
    result.update(contents(args.page))
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
