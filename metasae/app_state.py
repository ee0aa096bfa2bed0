"""Dashboard state without Streamlit: which atlases to open, URL query parameters parsed and checked, and which
backend answers the live pages (found or started, warmed in the background).

The app keeps every selection in the URL (``st.query_params``), so anything a visitor can type there arrives
here first. Each parser returns a clean value or raises ``BadInput`` with a message fit to show on the page
(what was wrong and what is allowed); pages never see a raw string or a traceback.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metasae.atlas import MANIFEST, Atlas, AtlasError

ENV_ATLAS = "METASAE_ATLAS"
REPO_ROOT = Path(__file__).resolve().parent.parent
# METASAE_BUNDLED moves (or, pointed at a folder with no atlas, hides) the bundled atlas, e.g. in tests.
BUNDLED_DIR = Path(os.environ.get("METASAE_BUNDLED") or REPO_ROOT / "data")
MAX_QUERY_CHARS = 500  # longer search queries are cut (a label is a few words; 10 kB of text matches nothing)
MAX_TEXT_CHARS = 4000  # live text box
MAX_TERMS = 16  # terms in a composed direction
_HUB_ID = re.compile(r"^(?:hf://)?([A-Za-z0-9][\w.-]{0,95})/([A-Za-z0-9][\w.-]{0,95})(?:@([\w./-]{1,100}))?$")


class BadInput(ValueError):
    """A URL parameter or form value the page cannot use; the message is shown to the visitor as is."""


# --------------------------------------------------------------------------------------------- atlas sources


@dataclass(frozen=True)
class AtlasSource:
    """One atlas the dashboard can open: a folder, or a Hugging Face dataset repo (``owner/name[@rev]``)."""

    spec: str  # as given (path or repo id)
    key: str  # short unique name, used in the URL (?atlas=...) and the sidebar
    kind: str  # "folder" | "hub"
    bundled: bool = False

    @property
    def path(self) -> Path:
        return Path(self.spec).expanduser()

    @property
    def title(self) -> str:
        if self.bundled:
            return f"{self.key} (bundled demo)"
        return self.key if self.kind == "folder" else f"{self.key} (hub)"


def classify(spec: str) -> str:
    """``"hub"`` for ``owner/name`` (or ``hf://owner/name[@rev]``) that is not an existing path, else ``"folder"``."""
    if spec.startswith("hf://"):
        return "hub"
    if Path(spec).expanduser().exists() or spec.startswith((".", "/", "~")):
        return "folder"
    return "hub" if _HUB_ID.match(spec) else "folder"


def _atlas_args(argv: Sequence[str]) -> list[str]:
    """Values of ``--atlas X`` / ``--atlas=X`` in argv (other arguments are ignored: pytest's, streamlit's)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--atlas" and i + 1 < len(argv):
            out.append(argv[i + 1])
            i += 1
        elif arg.startswith("--atlas="):
            out.append(arg.split("=", 1)[1])
        i += 1
    return out


def _split(values: Sequence[str]) -> list[str]:
    return [p.strip() for v in values for p in v.split(",") if p.strip()]


def sources_from(argv: Sequence[str], env: Mapping[str, str] | None = None,
                 bundled: Path | None = None) -> list[AtlasSource]:
    """Atlases named by ``--atlas`` (after ``--`` on the streamlit command line) and ``$METASAE_ATLAS``
    (comma-separated, paths or hub repo ids), then the bundled ``data/`` atlas.

    The bundled atlas is listed when nothing else is named, or when it exists (holds a manifest).
    """
    env = os.environ if env is None else env
    bundled = BUNDLED_DIR if bundled is None else bundled
    specs = _split(_atlas_args(argv)) + _split([env.get(ENV_ATLAS, "")])
    out: list[AtlasSource] = []
    seen_specs: set[str] = set()
    used: set[str] = set()

    def add(spec: str, is_bundled: bool = False) -> None:
        kind = "folder" if is_bundled else classify(spec)
        norm = str(Path(spec).expanduser().resolve()) if kind == "folder" else spec
        if norm in seen_specs:
            return
        seen_specs.add(norm)
        if kind == "folder":
            p = Path(spec).expanduser().resolve()
            base = p.name or "atlas"
            if base in ("data", "atlas") and p.parent.name:
                base = p.parent.name if not is_bundled else "data"
        else:
            base = _HUB_ID.match(spec).group(2) if _HUB_ID.match(spec) else spec  # type: ignore[union-attr]
        key, n = base, 2
        while key in used:
            key, n = f"{base}-{n}", n + 1
        used.add(key)
        out.append(AtlasSource(spec=spec, key=key, kind=kind, bundled=is_bundled))

    for s in specs:
        add(s)
    if not out or (bundled / MANIFEST).is_file():
        add(str(bundled), is_bundled=True)
    return out


def missing_bundled_message(path: Path) -> str:
    return (f"The bundled demo atlas is not in `{path}` yet (it is built by "
            f"`metasae build --preset demo --out data`, which takes hours on a CPU). Open another atlas with "
            f"`streamlit run app.py -- --atlas PATH` or `METASAE_ATLAS=PATH` (a folder or a Hugging Face "
            f"dataset repo id); `metasae build --preset tiny --out /tmp/tiny` makes a small one in a minute.")


def open_source(source: AtlasSource) -> Atlas:
    """Open (downloading first, for a hub repo) and verify one atlas; AtlasError with a readable message."""
    if source.kind == "hub":
        from metasae.hub import pull

        m = _HUB_ID.match(source.spec)
        if not m:
            raise AtlasError(f"{source.spec!r} is not a Hugging Face repo id (owner/name[@revision])")
        path = pull(f"{m.group(1)}/{m.group(2)}", revision=m.group(3))
    else:
        path = source.path
        if source.bundled and not (path / MANIFEST).is_file():
            raise AtlasError(missing_bundled_message(path))
        if not path.exists():
            raise AtlasError(f"{path}: no such folder (given as atlas {source.spec!r})")
    try:
        return Atlas.open(path, verify=True)
    except AtlasError:
        raise
    except Exception as e:  # anything a damaged folder can raise (OSError, Arrow errors) becomes one message
        raise AtlasError(f"{path}: cannot be opened as an atlas ({type(e).__name__}: {e})") from e


def pick_source(sources: Sequence[AtlasSource], key: str | None) -> AtlasSource:
    """The source named ``key`` (from ``?atlas=``); BadInput when no atlas has that name."""
    if key is None or key == "":
        return sources[0]
    for s in sources:
        if s.key == key:
            return s
    raise BadInput(f"There is no atlas named {short(key)!r} here (atlases: {', '.join(s.key for s in sources)}); "
                   f"showing {sources[0].key!r}.")


# --------------------------------------------------------------------------------------------- URL parameters


def short(text: Any, n: int = 60) -> str:
    """A value quoted in a message, cut to ``n`` characters."""
    s = str(text)
    return s if len(s) <= n else s[: n - 1] + "…"


MAX_INT_DIGITS = 18  # beyond any width or latent id; longer whole numbers are reported as out of range


def parse_int(value: str | None, name: str) -> int | None:
    """An integer URL parameter (None when absent or empty)."""
    if value is None or str(value).strip() == "":
        return None
    s = str(value).strip()
    if not re.fullmatch(r"[+-]?\d+", s):
        raise BadInput(f"{name} {short(s)!r} in the URL is not a whole number.")
    if len(s.lstrip("+-")) > MAX_INT_DIGITS:
        raise BadInput(f"{name} {short(s)} in the URL is out of range (a whole number of {len(s.lstrip('+-'))} "
                       f"digits; this atlas's ids have at most {MAX_INT_DIGITS}).")
    return int(s)


def cut_text(text: str | None, limit: int = MAX_TEXT_CHARS) -> tuple[str, str | None]:
    """(text to use, what was cut or None): text longer than ``limit`` characters keeps its first ``limit``."""
    t = "" if text is None else str(text)
    if len(t) <= limit:
        return t, None
    return t[:limit], (f"The text has {len(t):,} characters; the limit is {limit:,}, so only the first {limit:,} "
                       f"are used (cut after …{short(t[max(0, limit - 40):limit], 40)!r}; "
                       f"{len(t) - limit:,} characters dropped).")


def parse_float(value: str | None, name: str) -> float | None:
    """A finite float URL parameter (None when absent or empty)."""
    if value is None or str(value).strip() == "":
        return None
    s = str(value).strip()
    try:
        x = float(s) if len(s) <= 40 else math.nan
    except ValueError:
        x = math.nan
    if not math.isfinite(x):
        raise BadInput(f"{name} {short(s)!r} in the URL is not a number.")
    return x


def parse_int_list(value: str | None, name: str) -> list[int]:
    """Comma-separated integers (``"64,128"``); empty list when absent."""
    if value is None or str(value).strip() == "":
        return []
    out = []
    for part in str(value).split(","):
        if part.strip():
            i = parse_int(part, name)
            assert i is not None
            out.append(i)
    return out


def check_width(atlas: Atlas, width: int) -> int:
    if width not in atlas.widths:
        raise BadInput(f"Width {width} is not in this atlas (widths: {', '.join(map(str, atlas.widths))}).")
    return width


def resolve_latent(atlas: Atlas, width: str | None, latent: str | None) -> tuple[int, int]:
    """(width, latent) from URL strings; defaults fill what is absent; BadInput names what is wrong."""
    if not atlas.widths:
        raise BadInput("This atlas holds no latents.")
    w = parse_int(width, "Width")
    w = default_width(atlas) if w is None else check_width(atlas, w)
    i = parse_int(latent, "Latent")
    if i is None:
        return w, 0
    n = atlas.n_latents(w)
    if not 0 <= i < n:
        raise BadInput(f"Latent {i} is not in width {w} (it has {n} latents, numbered 0 to {n - 1}).")
    return w, i


def default_width(atlas: Atlas) -> int:
    """The width a bare latent page opens: the second smallest (it has a smaller and usually a larger neighbour)."""
    ws = atlas.widths
    return ws[1] if len(ws) > 1 else ws[0]


def resolve_meta(atlas: Atlas, meta: str | None) -> int:
    """A meta-latent id from the URL (default 0)."""
    if atlas.n_meta_latents == 0:
        raise BadInput("This atlas holds no meta-latents.")
    m = parse_int(meta, "Meta-latent")
    if m is None:
        return int(atlas.tables["meta_latents"]["meta_latent"][0].as_py())
    try:
        atlas.meta_latent(m)
    except KeyError:
        raise BadInput(f"Meta-latent {m} is not in this atlas (it has {atlas.n_meta_latents} meta-latents).") from None
    return m


def resolve_pair(atlas: Atlas, pair: str | None) -> tuple[int, int]:
    """A stitching pair ``"small-large"`` from the URL (default: the first measured pair)."""
    pairs = page_pairs(atlas)
    if not pairs:
        raise BadInput("This atlas has no stitching pairs (it needs at least two widths).")
    if pair is None or pair.strip() == "":
        return pairs[0]
    m = re.fullmatch(r"\s*(\d{1,9})\s*[-_:x]\s*(\d{1,9})\s*", pair)
    if not m:
        raise BadInput(f"Pair {short(pair)!r} in the URL should look like 'small-large', e.g. "
                       f"'{pairs[0][0]}-{pairs[0][1]}'.")
    p = (int(m.group(1)), int(m.group(2)))
    if p not in pairs:
        raise BadInput(f"Pair {p[0]}-{p[1]} is not in this atlas (pairs: "
                       f"{', '.join(f'{a}-{b}' for a, b in pairs)}).")
    return p


def page_pairs(atlas: Atlas) -> list[tuple[int, int]]:
    """The pairs the Stitching page offers: those with a curve (``Atlas.stitching_pairs``), else neighbouring
    widths (the latents table still has kinds and deltas)."""
    pairs = atlas.stitching_pairs()
    if pairs:
        return pairs
    ws = atlas.widths
    return list(zip(ws[:-1], ws[1:], strict=True))


def clean_query(query: str | None, limit: int = MAX_QUERY_CHARS) -> tuple[str, str | None]:
    """(query to run, warning or None): strips, drops control characters, cuts to ``limit`` characters."""
    q = "" if query is None else str(query)
    q = "".join(ch if ch.isprintable() or ch == " " else " " for ch in q).strip()
    if len(q) > limit:
        return q[:limit], f"The query was {len(q):,} characters long; only its first {limit} are searched."
    return q, None


# --------------------------------------------------------------------------------------------- live directions


@dataclass(frozen=True)
class Term:
    coef: float
    width: int
    latent: int


_TERM = re.compile(r"\s*([+-])?\s*(?:(\d+(?:\.\d*)?|\.\d+)\s*\*\s*)?(\d{1,9})\s*[:/#]\s*(\d{1,9})\s*")


def parse_direction(expr: str | None, atlas: Atlas | None = None) -> list[Term]:
    """``"128:7 - 128:3 + 0.5*256:42"`` -> terms (coefficient, width, latent); checked against ``atlas``."""
    text = (expr or "").strip()
    if not text:
        raise BadInput("Type a direction such as `128:7 - 128:3 + 256:42` (width:latent, joined by + and -).")
    if len(text) > 400:
        raise BadInput(f"The direction is {len(text)} characters long; keep it under 400 (at most {MAX_TERMS} terms).")
    terms: list[Term] = []
    pos = 0
    while pos < len(text):
        m = _TERM.match(text, pos)
        if not m or m.end() == pos or (terms and not m.group(1)):
            raise BadInput(f"Cannot read the direction at {short(text[pos:], 20)!r}: write terms as width:latent "
                           "with an optional coefficient (0.5*128:7), joined by + or -.")
        sign = -1.0 if m.group(1) == "-" else 1.0
        coef = sign * (float(m.group(2)) if m.group(2) else 1.0)
        terms.append(Term(coef, int(m.group(3)), int(m.group(4))))
        pos = m.end()
    if len(terms) > MAX_TERMS:
        raise BadInput(f"The direction has {len(terms)} terms; at most {MAX_TERMS} are allowed.")
    if atlas is not None:
        for t in terms:
            resolve_latent(atlas, str(t.width), str(t.latent))
    return terms


def parse_vector(text: str | None, d_model: int | None) -> list[float]:
    """A pasted vector: numbers separated by commas, spaces or newlines (brackets allowed)."""
    raw = (text or "").strip().strip("[]()")
    if not raw:
        raise BadInput(f"Paste {d_model or 'd_model'} numbers separated by commas or spaces.")
    if len(raw) > 200_000:
        raise BadInput("The pasted vector is too long (over 200,000 characters).")
    parts = [p for p in re.split(r"[\s,;]+", raw) if p]
    vals = []
    for p in parts:
        try:
            x = float(p)
        except ValueError:
            raise BadInput(f"{short(p, 20)!r} in the pasted vector is not a number.") from None
        if not math.isfinite(x):
            raise BadInput("The pasted vector holds NaN or infinity.")
        vals.append(x)
    if d_model is not None and len(vals) != d_model:
        raise BadInput(f"The pasted vector has {len(vals)} numbers; this atlas's model has d_model = {d_model}.")
    return vals


# --------------------------------------------------------------------------------------------- backend


def get_backend(atlas_path: str | None = None, preload: bool = False) -> tuple[Any | None, str | None]:
    """(backend, None), or (None, why it is unavailable).

    ``metasae.backend.client.get_backend``: METASAE_BACKEND_URL when set, else a local backend subprocess for
    ``atlas_path`` (started on first need, seconds; ``preload``: it loads the model and SAEs at once). Cache the
    result.
    """
    try:
        from metasae.backend.client import get_backend as _get
    except ImportError as e:
        return None, f"Backend unavailable: the backend client cannot be imported ({e})."
    try:
        return _get(atlas_path, preload=preload), None
    except Exception as e:  # a backend that cannot start or be reached: say why, never a traceback
        return None, f"Backend unavailable: {e}"


WARM_ENV = "METASAE_WARM_BACKEND"  # "0": do not start the local backend when the app starts


def warm_backend(atlas: Atlas, env: Mapping[str, str] | None = None) -> bool:
    """Start the local backend for ``atlas`` in a background thread, loading the model and SAEs at once
    (METASAE_PRELOAD), so the first Live result does not wait for them. Skipped for a remote backend
    (METASAE_BACKEND_URL), a synthetic atlas (no model to load) or METASAE_WARM_BACKEND=0. True if started."""
    env = os.environ if env is None else env
    if env.get("METASAE_BACKEND_URL") or env.get(WARM_ENV, "1") == "0" or atlas.manifest.synthetic:
        return False
    # preload only this backend: setting METASAE_PRELOAD in our own environment would reach every backend
    # started later by this process (tests start many)
    threading.Thread(target=get_backend, args=(str(atlas.path),), kwargs={"preload": True},
                     name="metasae-warm-backend", daemon=True).start()
    return True


def backend_problem(health: dict[str, Any], atlas: Atlas) -> str | None:
    """Why a backend's answers would not fit this atlas (another model, or it failed to open its atlas)."""
    if health.get("status") == "error" or health.get("atlas_error"):
        return f"The backend cannot serve its atlas: {health.get('atlas_error') or 'error'}"
    model = health.get("model")
    if model and atlas.model_name and model != atlas.model_name:
        return (f"The backend serves an atlas of model {model!r}, this one is of {atlas.model_name!r}: its "
                "answers would not match this atlas. Point METASAE_BACKEND_URL at a backend for this atlas.")
    return None
