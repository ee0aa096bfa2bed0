"""Text corpora that come from installed packages, cleaned and cut into fixed-length token contexts.

Built-in sources (nothing is downloaded at run time):

- ``"wiki"``: the 206-page Wikipedia sample shipped inside the gensim wheel (about 106 real articles once
  redirects are dropped), cleaned with ``gensim.corpora.wikicorpus.filter_wiki``;
- ``"wordnet"``: Debian ``wordnet-base`` glosses (``/usr/share/wordnet/data.*``), one line per synset
  ``"lemma1, lemma2: gloss"``, grouped into documents of ``WORDNET_SYNSETS_PER_DOC`` synsets;
- ``"file:PATH"`` or a plain existing path: a text file, or a folder of ``.txt``/``.md`` files (recursive).

``build_contexts`` = ``load_texts`` + ``tokenize_contexts``: documents are tokenised, joined with a separator
token (EOS by default), cut into rows of exactly ``ctx_len`` tokens and shuffled deterministically.
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

WIKI_SAMPLE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
WORDNET_SYNSETS_PER_DOC = 50
WIKI_MIN_CHARS = 200  # cleaned pages shorter than this (stubs, leftovers) are dropped
TEXT_SUFFIXES = (".txt", ".md")
BUILTIN_SOURCES = ("wiki", "wordnet")
_TOKENIZE_BATCH = 128
_PROGRESS_MIN_TEXTS = 200


class CorpusError(ValueError):
    """A corpus source is unknown, missing, not installed or gives no text."""


# ----------------------------------------------------------------------------------------- sources


def _wiki_path() -> Path | None:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / WIKI_SAMPLE
    return path if path.is_file() else None


def _wordnet_ok(folder: Path) -> bool:
    return all((folder / name).is_file() for name in WORDNET_FILES)


def available_sources() -> dict[str, bool]:
    """Which built-in sources exist on this machine: ``{"wiki": bool, "wordnet": bool}``."""
    return {"wiki": _wiki_path() is not None, "wordnet": _wordnet_ok(WORDNET_DIR)}


_HEADING = re.compile(r"^\s*(=+)\s*(.*?)\s*\1\s*$", re.MULTILINE)
_GALLERY = re.compile(r"^\s*(?:File|Image):[^\n]*$", re.MULTILINE | re.IGNORECASE)
_ALT = re.compile(r"\|\s*alt\s*=[^\n]*")
_MAGIC = re.compile(r"__[A-Z]+__")
_QUOTES = re.compile(r"'{2,}")
_SPACES = re.compile(r"[ \t\xa0\u2009\u200b]+")


def clean_wiki(text: str) -> str:
    """Wikitext -> plain text: ``filter_wiki`` plus headings, bold/italics, galleries and whitespace."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(text)
    text = _HEADING.sub(r"\2", text)
    text = _GALLERY.sub("", text)
    text = _ALT.sub("", text)
    text = _MAGIC.sub("", text)
    text = _QUOTES.sub("", text)
    lines = (_SPACES.sub(" ", line).strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)


@functools.lru_cache(maxsize=4)
def _load_wiki(path: str) -> tuple[str, ...]:
    from gensim.corpora.wikicorpus import extract_pages

    docs = []
    with bz2.open(path, "rb") as f:
        for _title, text, _pageid in extract_pages(f, filter_namespaces=("0",)):
            if text.lstrip()[:9].lower() == "#redirect":
                continue
            cleaned = clean_wiki(text)
            if len(cleaned) >= WIKI_MIN_CHARS:
                docs.append(cleaned)
    return tuple(docs)


_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")


def parse_wordnet_line(line: str) -> str | None:
    """One ``data.*`` line -> ``"lemma1, lemma2: gloss"``; None for license/header lines."""
    if not line or line.startswith("  ") or " | " not in line:
        return None
    head, gloss = line.split(" | ", 1)
    fields = head.split()
    try:
        n_words = int(fields[3], 16)
    except (IndexError, ValueError):
        return None
    lemmas: list[str] = []
    for word in fields[4 : 4 + 2 * n_words : 2]:
        lemma = _ADJ_MARKER.sub("", word).replace("_", " ")
        if lemma not in lemmas:
            lemmas.append(lemma)
    gloss = gloss.strip()
    if not lemmas or not gloss:
        return None
    return f"{', '.join(lemmas)}: {gloss}"


@functools.lru_cache(maxsize=4)
def _load_wordnet(folder: str, per_doc: int) -> tuple[str, ...]:
    glosses: list[str] = []
    for name in WORDNET_FILES:
        with open(Path(folder) / name, encoding="utf-8", errors="replace") as f:
            for line in f:
                entry = parse_wordnet_line(line.rstrip("\n"))
                if entry is not None:
                    glosses.append(entry)
    return tuple("\n".join(glosses[i : i + per_doc]) for i in range(0, len(glosses), per_doc))


def _load_path(source: str, path: Path) -> list[str]:
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise CorpusError(f"corpus source {source!r}: folder {path} holds no .txt or .md files")
    else:
        raise CorpusError(f"corpus source {source!r}: no such file or folder: {path}")
    docs = []
    for file in files:
        text = file.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            docs.append(text)
    if not docs:
        raise CorpusError(f"corpus source {source!r}: {path} holds only empty files")
    return docs


def _load_source(source: str) -> list[str]:
    if source == "wiki":
        path = _wiki_path()
        if path is None:
            raise CorpusError(
                f"corpus source 'wiki': the gensim Wikipedia sample ({WIKI_SAMPLE}) was not found; "
                "install gensim (pip install gensim)"
            )
        return list(_load_wiki(str(path)))
    if source == "wordnet":
        if not _wordnet_ok(WORDNET_DIR):
            raise CorpusError(
                f"corpus source 'wordnet': WordNet glosses not found in {WORDNET_DIR} "
                f"(need {', '.join(WORDNET_FILES)}); run `apt-get install wordnet-base` (as root), "
                "or use available_sources() to pick another source"
            )
        return list(_load_wordnet(str(WORDNET_DIR), WORDNET_SYNSETS_PER_DOC))
    if source.startswith("file:"):
        return _load_path(source, Path(source[len("file:") :]).expanduser())
    path = Path(source).expanduser()
    if path.exists():
        return _load_path(source, path)
    if any(sep in source for sep in ("/", "\\")) or path.suffix.lower() in TEXT_SUFFIXES:
        raise CorpusError(f"corpus source {source!r}: no such file or folder: {path}")
    raise CorpusError(
        f"unknown corpus source {source!r}: use one of {', '.join(BUILTIN_SOURCES)}, "
        "'file:PATH' or an existing file/folder path"
    )


def load_texts(sources: Sequence[str], max_docs: int | None = None) -> list[str]:
    """Documents from each source in order; ``max_docs`` caps the documents taken from *each* source."""
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise CorpusError("no corpus sources given")
    if max_docs is not None and max_docs < 1:
        raise CorpusError(f"max_docs must be >= 1, got {max_docs}")
    texts: list[str] = []
    for source in sources:
        docs = _load_source(str(source))
        if max_docs is not None:
            docs = docs[:max_docs]
        if not docs:
            raise CorpusError(f"corpus source {source!r} gave no text")
        log.info("corpus source %r: %d documents", source, len(docs))
        texts.extend(docs)
    return texts


# ---------------------------------------------------------------------------------------- tokens


def _encode(tokenizer: Any, batch: list[str]) -> list[list[int]]:
    try:
        out = tokenizer(batch, add_special_tokens=False, verbose=False)
    except TypeError:  # tokenizers that do not take `verbose`
        out = tokenizer(batch, add_special_tokens=False)
    return out["input_ids"]


def tokenize_contexts(
    texts: Sequence[str],
    tokenizer: Any,
    ctx_len: int,
    max_tokens: int | None = None,
    seed: int = 0,
    sep_token_id: int | None = None,
) -> torch.Tensor:
    """Tokenise ``texts``, join them with ``sep_token_id`` (default: the tokenizer's EOS; none if it has
    no EOS), cut into rows of exactly ``ctx_len`` tokens (the ragged tail is dropped), shuffle the rows with
    ``seed`` and keep the first ``max_tokens // ctx_len``. Returns int64 ``(n_ctx, ctx_len)``; for one
    seed a larger ``max_tokens`` gives a superset (same leading rows)."""
    if ctx_len < 1:
        raise ValueError(f"ctx_len must be >= 1, got {ctx_len}")
    if isinstance(texts, str):
        texts = [texts]
    if sep_token_id is None:
        sep_token_id = getattr(tokenizer, "eos_token_id", None)
    sep = np.asarray([] if sep_token_id is None else [int(sep_token_id)], dtype=np.int64)

    from tqdm.auto import tqdm

    pieces: list[np.ndarray] = []
    n_docs = 0
    with tqdm(
        total=len(texts), desc="tokenizing", unit="doc", disable=len(texts) <= _PROGRESS_MIN_TEXTS
    ) as bar:
        for start in range(0, len(texts), _TOKENIZE_BATCH):
            batch = [str(t) for t in texts[start : start + _TOKENIZE_BATCH]]
            for ids in _encode(tokenizer, batch):
                if len(ids) == 0:
                    continue
                if n_docs:
                    pieces.append(sep)
                pieces.append(np.asarray(ids, dtype=np.int64))
                n_docs += 1
            bar.update(len(batch))
    if n_docs == 0:
        raise CorpusError(f"no tokens: the {len(texts)} texts given are empty")

    stream = np.concatenate(pieces)
    n_rows = len(stream) // ctx_len
    if n_rows == 0:
        raise CorpusError(f"corpus has {len(stream)} tokens, fewer than one context of {ctx_len}")
    rows = torch.from_numpy(stream[: n_rows * ctx_len].reshape(n_rows, ctx_len))
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed))
    keep = n_rows if max_tokens is None else min(n_rows, max_tokens // ctx_len)
    if keep == 0:
        raise CorpusError(f"max_tokens={max_tokens} is less than one context of {ctx_len} tokens")
    if max_tokens is not None and keep < max_tokens // ctx_len:
        log.warning(
            "corpus has only %d contexts of %d tokens (%d tokens), fewer than max_tokens=%d asks for",
            n_rows,
            ctx_len,
            n_rows * ctx_len,
            max_tokens,
        )
    return rows[perm[:keep]]


def build_contexts(
    sources: Sequence[str],
    tokenizer: Any,
    ctx_len: int,
    max_tokens: int | None,
    seed: int = 0,
) -> torch.Tensor:
    """``load_texts(sources)`` then ``tokenize_contexts``: int64 ``(n_ctx, ctx_len)`` token contexts."""
    return tokenize_contexts(load_texts(sources), tokenizer, ctx_len, max_tokens=max_tokens, seed=seed)
