"""README screenshots of the dashboard: `python scripts/screenshots.py --atlas PATH --out docs/screenshots`.

Starts `streamlit run app.py` on the atlas, opens the six pages in headless Debian Chromium (Playwright) at deep
links chosen from the atlas itself (a well-labelled latent of the largest width, its top meta-latent, a word of
its top tokens, the largest stitching pair), waits until each page has finished drawing and saves full-page PNGs
(overview, latent, meta_latent, search, stitching, live; then live_text and live_one_latent, text through the
app's own backend, which it starts with the model loading in the background). The browser setup follows
tests/browser/test_dashboard.py.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metasae.atlas import Atlas  # noqa: E402
from metasae.browser import CHROMIUM, CHROMIUM_ARGS, start_streamlit, stop  # noqa: E402

LIVE_TEXT = ("Albert Einstein was a German-born theoretical physicist who developed the theory of relativity. "
             "Marie Curie was a Polish and naturalised-French physicist and chemist.")
TIMEOUT_MS = 180_000  # a busy machine (or a paper-scale atlas opened and verified the first time) is slow
WIDTH = 1400
# labels worth showing first: the README's running example is the "Albert Einstein" latent
WORDS = re.compile(r"einstein|physicist|german|city|paris|london|france|president|river|science", re.I)
# the page is done: no run in progress, no spinner or skeleton, every plotly chart and dataframe drawn
BUSY = ", ".join(f"[data-testid={t}]" for t in ("stStatusWidgetRunningIcon", "stSpinner", "stSkeleton", "stAppSkeleton"))
RENDERED = f"""() => !document.querySelector('{BUSY}')
  && [...document.querySelectorAll('[data-testid=stPlotlyChart]')].every(c => c.querySelector('.main-svg'))
  && [...document.querySelectorAll('[data-testid=stDataFrame]')].every(d => d.querySelector('canvas'))"""
HEIGHT = ("Math.max(...[...document.querySelectorAll('[data-testid=stMain], [data-testid=stAppViewContainer]')]"
          ".map(e => e.scrollHeight))")


def _words(label: str) -> list[str]:
    """The token parts of an offline label (`tok / tok / tok [→boosted]`)."""
    return [p.strip() for p in label.split(" [→")[0].split(" / ") if p.strip()]


def _tier(label: str | None) -> int:
    """0: names a preferred word; 1: only real words; 2: readable; 3: anything alive; 9: dead / unlabelled."""
    if not label or label == "(dead)":
        return 9
    if "\ufffd" in label:
        return 3
    if WORDS.search(label):
        return 0
    parts = _words(label)
    return 1 if parts and all(re.fullmatch(r"[A-Za-z][A-Za-z ]{2,}", p) for p in parts) else 2


def pick_latent(atlas: Atlas) -> tuple[int, int]:
    """A latent of the largest width: best label tier, then densest, with a decomposition of >= 3 meta-latents."""
    width = max(atlas.widths)
    t = atlas.latents_table(width, ["latent", "label", "density"])
    t = t.assign(tier=t["label"].map(_tier))
    t = t[(t["tier"] < 9) & (t["density"].fillna(0) > 0)].sort_values(["tier", "density"], ascending=[True, False])
    for latent in t["latent"][:5000]:
        if len(atlas.decomposition(width, int(latent))) >= 3:
            return width, int(latent)
    return width, int(t["latent"].iloc[0]) if len(t) else 0


def pick_query(atlas: Atlas, width: int, latent: int) -> tuple[str, int]:
    """A word of the latent's top tokens (then of its label) that the text search finds: (query, n results)."""
    from metasae.search import SearchIndex
    from metasae.views.search import text_search

    row = atlas.latent(width, latent)
    raw = [str(x).replace("\u0120", " ").replace("\u2581", " ").strip() for x in row.get("top_tokens") or []]
    raw += re.findall(r"[A-Za-z]{3,}", row.get("label") or "")
    # the strongest top token that is a real word first (rank order kept), then shorter / non-alphabetic ones
    cands = sorted(dict.fromkeys(w for w in raw if w and w.isprintable()), key=lambda w: (not w.isalpha(), len(w) < 3))
    index = SearchIndex(atlas)
    for q in [*cands[:20], row.get("label") or ""]:
        n = len(text_search(index, q).results)
        if n:
            return q, n
    return "", 0


def settle(page) -> None:
    """Wait until the page is drawn and its height has stopped changing."""
    last = None
    for _ in range(60):
        page.wait_for_function(RENDERED, polling=200)
        now = page.evaluate(f"[{HEIGHT}, document.querySelectorAll('[data-testid=stMain] *').length]")
        if now == last:
            return
        last = now
        page.wait_for_timeout(700)


def shoot(page, base: str, path: str, expect: list[str], out: Path) -> Path:
    page.goto(base + path)
    for text in expect:
        page.get_by_text(text, exact=False).first.wait_for()
    settle(page)
    main = page.locator("[data-testid='stMain']").inner_text()
    if "Traceback" in main:
        raise RuntimeError(f"{path}: the page shows a traceback:\n{main[:2000]}")
    height = page.evaluate(HEIGHT)
    page.set_viewport_size({"width": WIDTH, "height": min(max(int(height) + 40, 900), 7000)})
    page.wait_for_timeout(1200)  # plotly charts re-lay out to the new size
    settle(page)
    page.screenshot(path=str(out))
    page.set_viewport_size({"width": WIDTH, "height": 1000})
    try:  # 256 colours are plenty for a UI and make the PNGs ~3x smaller
        from PIL import Image
    except ImportError:
        return out
    with Image.open(out) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    small.save(out, optimize=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--atlas", required=True, type=Path, help="atlas folder")
    ap.add_argument("--out", default=ROOT / "docs" / "screenshots", type=Path, help="folder for the PNGs")
    a = ap.parse_args()
    atlas_dir = a.atlas.expanduser().resolve()

    atlas = Atlas.open(atlas_dir)
    width, latent = pick_latent(atlas)
    dec = atlas.decomposition(width, latent)
    meta = int(dec["meta_latent"].iloc[0]) if len(dec) else 0
    query, n_found = pick_query(atlas, width, latent)
    pairs = atlas.stitching_pairs()
    small, large = max(pairs, key=lambda p: (p[1], p[0])) if pairs else (None, None)
    print(f"latent {width}/{latent} {atlas.latent(width, latent)['label']!r} ({len(dec)} meta-latents), "
          f"meta-latent {meta}, search {query!r} ({n_found} results), stitching {small}-{large}")
    del atlas

    views = [
        ("overview", "/", ["The ladder"]),
        ("latent", f"/latent?width={width}&latent={latent}", [f"Latent {width}/{latent}", "Meta-decomposition"]),
        ("meta_latent", f"/meta_latent?meta={meta}", [f"Meta-latent {meta}", "Member latents, strongest first"]),
        ("search", "/search?" + urllib.parse.urlencode({"q": query}),
         ["Latents 1–"] if n_found else ["Search latents"]),
        ("stitching", f"/stitching?pair={small}-{large}" if pairs else "/stitching",
         [f"Latents of width {large}"] if pairs else ["SAE stitching"]),
        ("live", f"/live?width={width}&latent={latent}", ["the meta-SAE gives"]),
        # text -> latents through the app's own backend (started with the app, model loading in the background)
        ("live_text", "/live?" + urllib.parse.urlencode({"text": LIVE_TEXT, "tw": width}), ["Hidden:"]),
        ("live_one_latent", "/live?" + urllib.parse.urlencode({"text": LIVE_TEXT, "tw": width, "tmode": "one",
                                                                "tl": latent}), ["fires on"]),
    ]
    a.out.mkdir(parents=True, exist_ok=True)
    log = Path(tempfile.mkstemp(prefix="metasae-screenshots-", suffix=".log")[1])
    proc, base = start_streamlit(atlas_dir, log, warm_backend=True)
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": WIDTH, "height": 1000})
                page.set_default_timeout(TIMEOUT_MS)
                for name, path, expect in views:
                    print(shoot(page, base, path, expect, a.out / f"{name}.png"), f"<- {path}", flush=True)
            finally:
                browser.close()
    finally:
        stop(proc)
    log.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
