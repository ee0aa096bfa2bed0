"""metasae.corpus: built-in text sources, cleaning, and deterministic fixed-length token contexts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from metasae import corpus
from metasae.corpus import CorpusError, available_sources, build_contexts, load_texts, tokenize_contexts

HAVE_WIKI = available_sources()["wiki"]
HAVE_WORDNET = available_sources()["wordnet"]
needs_wiki = pytest.mark.skipif(not HAVE_WIKI, reason="gensim's Wikipedia sample is not installed")
needs_wordnet = pytest.mark.skipif(
    not HAVE_WORDNET,
    reason=f"Debian wordnet-base is not installed ({corpus.WORDNET_DIR}/data.noun missing); "
    "run `apt-get install wordnet-base` to test the real WordNet source",
)

EINSTEIN = (
    "Einstein, Albert Einstein: physicist born in Germany who formulated the special theory of relativity "
    "and the general theory of relativity"
)
ASCII_TEXTS = [
    f"Document {i}: the quick brown fox number {i} jumps over {i % 7} lazy dogs near river {i * 3}."
    for i in range(40)
]


@pytest.fixture(scope="module")
def tok():
    """A small byte-level BPE tokenizer trained in-process (no network), wrapped as an HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    train = ASCII_TEXTS + (load_texts(["wiki"], max_docs=2) if HAVE_WIKI else [])
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<eos>", "<sep>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(train, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<eos>", clean_up_tokenization_spaces=False
    )


def _reference_rows(texts, tok, ctx_len, sep):
    stream: list[int] = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if ids:
            if stream:
                stream.append(sep)
            stream.extend(ids)
    n = len(stream) // ctx_len
    return [tuple(stream[i * ctx_len : (i + 1) * ctx_len]) for i in range(n)]


# ------------------------------------------------------------------------------------------ sources


def test_available_sources_reports_both_builtins():
    avail = available_sources()
    assert set(avail) == {"wiki", "wordnet"}
    assert all(isinstance(v, bool) for v in avail.values())
    assert avail["wordnet"] == (corpus.WORDNET_DIR / "data.noun").is_file()


@needs_wiki
def test_wiki_articles_are_cleaned():
    docs = load_texts(["wiki"])
    # 206 pages in the sample, 100 of them redirects: 106 articles remain.
    assert 100 <= len(docs) <= 206
    assert docs[0].startswith("Anarchism is a political philosophy that advocates self-governed societies")
    text = "\n".join(docs)
    for markup in ("[[", "]]", "{{", "}}", "'''", "==", "<ref", "#REDIRECT", "__TOC__", "&lt;", "&quot;"):
        assert markup not in text, markup
    assert not any(line.startswith("File:") for line in text.splitlines())
    assert "  " not in text and "\n\n" not in text  # whitespace collapsed
    assert all(len(d) >= corpus.WIKI_MIN_CHARS for d in docs)
    assert sum(map(len, docs)) > 2_000_000


@needs_wiki
def test_max_docs_caps_each_source(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "b.txt").write_text("beta text")
    docs = load_texts(["wiki", str(tmp_path)], max_docs=1)
    assert len(docs) == 2
    assert docs[0].startswith("Anarchism is")
    assert docs[1] == "alpha text"
    assert load_texts(["wiki"], max_docs=5) == load_texts(["wiki"])[:5]


@needs_wordnet
def test_wordnet_glosses_include_people():
    docs = load_texts(["wordnet"])
    lines = [line for doc in docs for line in doc.split("\n")]
    assert len(lines) == 117_659  # every synset of WordNet 3.0
    assert len(docs) == math.ceil(len(lines) / corpus.WORDNET_SYNSETS_PER_DOC)
    assert any(line.startswith(EINSTEIN) for line in lines)
    assert lines[0].startswith("entity: that which is perceived or known")
    text = "\n".join(docs)
    assert "LICENSEE" not in text and "Albert_Einstein" not in text
    assert "Johann Sebastian Bach" in text


def _write_fake_wordnet(folder: Path) -> None:
    header = "  1 This software and database is being provided to you, the LICENSEE, by  \n  2   \n"
    files = {
        "data.noun": header
        + "10954498 18 n 02 Einstein 0 Albert_Einstein 0 002 @i 10428004 n 0000 | physicist born in Germany  \n"
        + "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived  \n"
        + '00002000 03 n 02 dog 0 Dog 1 000 | a domestic animal; "the dog barked"  \n',
        "data.verb": header + "00003662 29 v 01 force_out 0 001 @ 00105333 v 0000 02 + 08 00 | emit  \n",
        "data.adj": header
        + "00020103 00 s 02 outback(a) 0 remote 0 003 & 00019874 a 0000 | inaccessible  \n",
        "data.adv": header,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def test_wordnet_parsing_on_fake_files(tmp_path, monkeypatch):
    _write_fake_wordnet(tmp_path / "wn")
    monkeypatch.setattr(corpus, "WORDNET_DIR", tmp_path / "wn")
    monkeypatch.setattr(corpus, "WORDNET_SYNSETS_PER_DOC", 2)
    assert available_sources()["wordnet"] is True
    docs = load_texts(["wordnet"])
    assert docs == [
        "Einstein, Albert Einstein: physicist born in Germany\nentity: that which is perceived",
        'dog, Dog: a domestic animal; "the dog barked"\nforce out: emit',
        "outback, remote: inaccessible",
    ]
    assert load_texts(["wordnet"], max_docs=1) == docs[:1]


def test_missing_wordnet_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "WORDNET_DIR", tmp_path / "nowhere")
    assert available_sources()["wordnet"] is False
    with pytest.raises(CorpusError, match=r"apt-get install wordnet-base"):
        load_texts(["wordnet"])


def test_file_and_folder_sources(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("  second file\n")
    (tmp_path / "a.md").write_text("# first file\nbody")
    (tmp_path / "sub" / "c.txt").write_text("third file")
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "code.py").write_text("print('not read')")
    expected = ["# first file\nbody", "second file", "third file"]
    assert load_texts([f"file:{tmp_path}"]) == expected
    assert load_texts([str(tmp_path)]) == expected
    assert load_texts(str(tmp_path)) == expected  # a single string is one source, not characters
    assert load_texts([str(tmp_path / "sub" / "c.txt")]) == ["third file"]
    assert load_texts([f"file:{tmp_path / 'b.txt'}", f"file:{tmp_path / 'sub'}"]) == [
        "second file",
        "third file",
    ]


@pytest.mark.parametrize(
    ("source", "pattern"),
    [
        ("nosuchsource", r"unknown corpus source 'nosuchsource'"),
        ("file:/no/such/dir", r"'file:/no/such/dir'.*no such file or folder"),
        ("/no/such/file.txt", r"no such file or folder: /no/such/file.txt"),
        ("missing.txt", r"'missing.txt'.*no such file or folder"),
    ],
)
def test_bad_sources_are_named(source, pattern):
    with pytest.raises(CorpusError, match=pattern):
        load_texts([source])


def test_empty_folder_and_empty_files(tmp_path):
    with pytest.raises(CorpusError, match=r"no \.txt or \.md files"):
        load_texts([str(tmp_path)])
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(CorpusError, match=r"only empty files"):
        load_texts([str(tmp_path)])
    with pytest.raises(CorpusError, match="no corpus sources"):
        load_texts([])
    assert issubclass(CorpusError, ValueError)


# ----------------------------------------------------------------------------------------- contexts


def test_contexts_shape_and_determinism(tok):
    a = tokenize_contexts(ASCII_TEXTS, tok, ctx_len=16, max_tokens=160, seed=0)
    assert a.shape == (10, 16) and a.dtype == torch.int64
    assert torch.equal(a, tokenize_contexts(ASCII_TEXTS, tok, ctx_len=16, max_tokens=160, seed=0))
    b = tokenize_contexts(ASCII_TEXTS, tok, ctx_len=16, max_tokens=160, seed=1)
    assert b.shape == a.shape and not torch.equal(a, b)
    # max_tokens not a multiple of ctx_len rounds down; a larger budget keeps the same leading rows
    c = tokenize_contexts(ASCII_TEXTS, tok, ctx_len=16, max_tokens=16 * 20 + 15, seed=0)
    assert c.shape == (20, 16) and torch.equal(c[:10], a)


def test_contexts_are_the_cut_stream_shuffled(tok):
    ctx_len = 12
    rows = tokenize_contexts(ASCII_TEXTS, tok, ctx_len=ctx_len, seed=3)
    reference = _reference_rows(ASCII_TEXTS, tok, ctx_len, tok.eos_token_id)
    assert rows.shape == (len(reference), ctx_len)
    assert sorted(map(tuple, rows.tolist())) == sorted(reference)
    assert [tuple(r) for r in rows.tolist()] != reference  # shuffled, not in stream order
    # the reference stream itself decodes back to the documents joined by the separator
    flat = [t for r in reference for t in r]
    assert "<eos>".join(ASCII_TEXTS).startswith(tok.decode(flat))


def test_round_trip_decodes_to_text_pieces(tok):
    eos = tok.eos_token_id
    rows = tokenize_contexts(ASCII_TEXTS, tok, ctx_len=20, seed=0)
    n_sep = 0
    for row in rows.tolist():
        piece: list[int] = []
        for t in [*row, eos]:
            if t == eos:
                n_sep += 1
                text = tok.decode(piece)
                assert any(text in doc for doc in ASCII_TEXTS), text
                piece = []
            else:
                piece.append(t)
    n_sep -= len(rows)
    assert 0 < n_sep <= len(ASCII_TEXTS) - 1  # separators only between documents


def test_custom_separator_and_empty_documents(tok):
    sep = tok.convert_tokens_to_ids("<sep>")
    texts = ["one two three", "", "four five six", "seven eight nine"]
    rows = tokenize_contexts(texts, tok, ctx_len=4, seed=0, sep_token_id=sep)
    flat = rows.flatten().tolist()
    assert tok.eos_token_id not in flat
    assert sorted(map(tuple, rows.tolist())) == sorted(_reference_rows(texts, tok, 4, sep))


def test_context_errors(tok):
    with pytest.raises(CorpusError, match="empty"):
        tokenize_contexts([], tok, ctx_len=8)
    with pytest.raises(CorpusError, match="empty"):
        tokenize_contexts(["", ""], tok, ctx_len=8)
    with pytest.raises(CorpusError, match="fewer than one context"):
        tokenize_contexts(["hi"], tok, ctx_len=512)
    with pytest.raises(CorpusError, match="max_tokens=7"):
        tokenize_contexts(ASCII_TEXTS, tok, ctx_len=8, max_tokens=7)
    with pytest.raises(ValueError, match="ctx_len"):
        tokenize_contexts(ASCII_TEXTS, tok, ctx_len=0)


def test_build_contexts_from_folder(tok, tmp_path):
    for i, text in enumerate(ASCII_TEXTS):
        (tmp_path / f"doc{i:02d}.txt").write_text(text)
    x = build_contexts([str(tmp_path)], tok, ctx_len=8, max_tokens=200, seed=5)
    assert x.shape == (25, 8)
    assert torch.equal(x, tokenize_contexts(ASCII_TEXTS, tok, ctx_len=8, max_tokens=200, seed=5))


@needs_wiki
def test_build_contexts_from_wiki(tok):
    x = build_contexts(["wiki"], tok, ctx_len=64, max_tokens=64 * 100, seed=0)
    assert x.shape == (100, 64)
    assert int(x.min()) >= 0 and int(x.max()) < len(tok)
    assert torch.equal(x, build_contexts(["wiki"], tok, ctx_len=64, max_tokens=64 * 100, seed=0))
