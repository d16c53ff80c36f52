"""Check built book pages in headless Chromium: MathJax rendered, no raw TeX left, no error cells; screenshots.

    python tools/check_html.py                      # every page of book/_build/html
    python tools/check_html.py intro tp_derivation  # some pages
    python tools/check_html.py --screenshot-dir .cache/shots intro   # also a PNG per page

A developer tool (not part of `make test`): it needs Debian's `chromium` (`apt-get install -y chromium`).
Chromium runs offline (`--disable-background-networking`); a page that needs the network to render its math
fails here, as it would for a reader without one. Checks per page:

- the DOM after scripts ran contains ``mjx-container`` when the page has math (``class="math``), i.e. the
  vendored MathJax loaded and typeset;
- no MathJax error (``mjx-merror``) and no raw ``\\(``/``$$`` delimiters left in the rendered text;
- no cell error output (``class="output traceback"`` / ``ename``) in a chapter.

Exit status 1 if any page fails.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HTML = ROOT / "book" / "_build" / "html"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage", "--hide-scrollbars",
         "--allow-file-access-from-files"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    sys.exit("check_html: no Chromium found; install it with `apt-get install -y chromium`")


def run_chromium(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="llmcomm-chromium-") as profile:
        return subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)


def dump_dom(page: Path, budget_ms: int, timeout: float) -> str:
    # --virtual-time-budget lets MathJax's asynchronous typesetting finish before the DOM is dumped.
    res = run_chromium([f"--virtual-time-budget={budget_ms}", "--dump-dom", page.as_uri()], timeout)
    if res.returncode != 0 or "<html" not in res.stdout:
        raise RuntimeError(f"chromium failed on {page} ({res.returncode}): {res.stderr[-2000:]}")
    return res.stdout


def screenshot(page: Path, out: Path, size: str, budget_ms: int, timeout: float) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    res = run_chromium([f"--virtual-time-budget={budget_ms}", f"--window-size={size}", f"--screenshot={out}",
                        page.as_uri()], timeout)
    if res.returncode != 0 or not out.is_file():
        raise RuntimeError(f"screenshot of {page} failed ({res.returncode}): {res.stderr[-2000:]}")
    return out


def visible_text(dom: str) -> str:
    dom = re.sub(r"(?is)<(script|style|mjx-container|mjx-assistive-mml|pre|code)\b.*?</\1>", " ", dom)
    return re.sub(r"(?s)<[^>]+>", " ", dom)


def check(page: Path, dom: str, source_html: str) -> list[str]:
    problems = []
    has_math = 'class="math' in source_html
    n_math = dom.count("<mjx-container")
    if has_math and n_math == 0:
        problems.append("page has math but MathJax rendered none (no mjx-container): MathJax did not load?")
    if "<mjx-merror" in dom:
        problems.append("MathJax reported a TeX error (mjx-merror)")
    text = visible_text(dom)
    for raw in (r"\(", r"\[", "$$"):
        if raw in text:
            problems.append(f"raw math delimiter {raw!r} left in the rendered text")
    if re.search(r'class="[^"]*\boutput\b[^"]*\btraceback\b', dom) or "cell_output error" in dom:
        problems.append("an executed cell shows an error")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pages", nargs="*", help="page names (intro) or .html paths; default: all pages")
    ap.add_argument("--html", type=Path, default=HTML, help="built book folder (default: book/_build/html)")
    ap.add_argument("--screenshot-dir", type=Path, help="write <page>.png screenshots here")
    ap.add_argument("--window-size", default="1280,1800", help="screenshot size W,H")
    ap.add_argument("--budget-ms", type=int, default=8000, help="virtual time for scripts to finish")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per Chromium call")
    args = ap.parse_args(argv)

    if not args.html.is_dir():
        sys.exit(f"check_html: {args.html} does not exist; run `make book` (or `make html`) first")
    skip = {"genindex.html", "search.html", "index.html"}  # index.html is a redirect to the root page
    if args.pages:
        pages = [Path(p) if p.endswith(".html") else args.html / f"{p}.html" for p in args.pages]
    else:
        pages = sorted(p for p in args.html.glob("*.html") if p.name not in skip)
    failed = 0
    for page in pages:
        if not page.is_file():
            print(f"FAIL {page}: no such page")
            failed += 1
            continue
        dom = ""
        try:
            dom = dump_dom(page.resolve(), args.budget_ms, args.timeout)
            problems = check(page, dom, page.read_text(encoding="utf-8"))
            shot = None
            if args.screenshot_dir:
                shot = screenshot(page.resolve(), (args.screenshot_dir / page.name).with_suffix(".png").resolve(),
                                  args.window_size, args.budget_ms, args.timeout)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            problems, shot = [str(exc)], None
        n_math = dom.count("<mjx-container")
        status = "FAIL" if problems else "ok  "
        print(f"{status} {page.name}: {n_math} math elements rendered" + (f"; screenshot {shot}" if shot else ""))
        for p in problems:
            print(f"     - {p}")
        failed += bool(problems)
    print(f"{len(pages) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
