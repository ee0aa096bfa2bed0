"""One loader for every model spec: tiny:<kind>[:<seed>], smollm2, a .gguf file, a local folder, a hub id."""

from __future__ import annotations

import json

import pytest
import torch

from metasae import model_spec
from metasae.lm import LanguageModel, ModelError, tiny_model
from metasae.model_spec import TinySpec, is_tiny, load_model, parse_tiny


def _same_weights(a: LanguageModel, b: LanguageModel) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values(),
                                                   strict=True))


@pytest.mark.parametrize(("spec", "parsed"), [
    ("tiny:llama", TinySpec("llama", None)),
    ("tiny:gpt2", TinySpec("gpt2", None)),
    ("tiny:llama:3", TinySpec("llama", 3)),
    ("tiny:gpt2:0", TinySpec("gpt2", 0)),
    ("tiny:gpt2:", TinySpec("gpt2", None)),
    ("tiny::2", TinySpec("llama", 2)),
    ("tiny:", TinySpec("llama", None)),
])
def test_tiny_specs_parse(spec, parsed):
    assert is_tiny(spec) and parse_tiny(spec) == parsed


@pytest.mark.parametrize(("spec", "match"), [
    ("tiny:bert", "unknown tiny model kind 'bert'"),
    ("tiny:llama:x", "not a non-negative integer"),
    ("tiny:llama:-1", "not a non-negative integer"),
    ("tiny:llama:1:2", "too many parts"),
    ("smollm2", "not a tiny model spec"),
])
def test_bad_tiny_specs_are_refused(spec, match):
    with pytest.raises(ModelError, match=match):
        parse_tiny(spec)


def test_tiny_models_load_with_the_spec_seed_else_the_callers():
    a = load_model("tiny:llama:3")
    assert a.source == "tiny:llama:3" and _same_weights(a, tiny_model("llama", seed=3))
    b = load_model("tiny:llama", seed=3)  # the build's seed when the spec has none; recorded in the source
    assert b.source == "tiny:llama:3" and _same_weights(a, b)
    assert load_model("tiny:llama:3", seed=5).source == "tiny:llama:3"  # the spec's seed wins
    c = load_model("tiny:gpt2:", dtype=torch.float64)
    assert c.source == "tiny:gpt2:0" and c.dtype == torch.float64 and c.device.type == "cpu"
    assert load_model(c.source, dtype=torch.float64).source == c.source  # a recorded source loads the same model
    assert load_model("tiny:").source == load_model("tiny::0").source == "tiny:llama:0"


def test_other_specs_go_to_language_model_load(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(LanguageModel, "load", classmethod(lambda cls, name, dtype, device: seen.append(
        (name, dtype, device)) or "loaded"))
    for spec in ("smollm2", str(tmp_path / "m.gguf"), str(tmp_path), "~/models/x", "HuggingFaceTB/SmolLM2-135M"):
        assert load_model(spec, dtype=torch.bfloat16, device="meta") == "loaded"
    assert [s for s, *_ in seen] == ["smollm2", str(tmp_path / "m.gguf"), str(tmp_path), "~/models/x",
                                     "HuggingFaceTB/SmolLM2-135M"]
    assert {(d, dev) for _, d, dev in seen} == {(torch.bfloat16, "meta")}


@pytest.mark.parametrize("spec", ["/nonexistent", "/nonexistent/model.gguf", "./no_such_model_folder"])
def test_missing_files_are_refused(spec):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(spec)


def test_a_folder_that_maps_to_custom_code_is_refused_before_loading(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"auto_map": {"AutoModelForCausalLM": "evil.Evil"}}))
    monkeypatch.setattr(LanguageModel, "load", classmethod(lambda cls, *a, **k: pytest.fail("loaded")))
    with pytest.raises(ModelError, match="trust_remote_code"):
        load_model(str(tmp_path))


def test_every_caller_loads_through_the_one_loader(monkeypatch):
    from metasae import distributed
    from metasae.backend import resources
    from metasae.pipeline import context
    from metasae.pipeline.config import BuildConfig

    calls = []
    monkeypatch.setattr(model_spec, "load_model", lambda spec, **kw: calls.append((spec, kw)) or spec)
    assert context.load_model(BuildConfig(model="tiny:gpt2", seed=4)) == "tiny:gpt2"
    assert distributed.load_model("tiny:llama:1", device="cpu") == "tiny:llama:1"
    assert resources.load_language_model("smollm2", "cpu") == "smollm2"
    assert calls == [("tiny:gpt2", {"seed": 4}), ("tiny:llama:1", {"dtype": torch.float32, "device": "cpu"}),
                     ("smollm2", {"device": "cpu"})]
