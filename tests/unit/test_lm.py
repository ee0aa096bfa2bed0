"""metasae.lm: residual reads, splicing (its layer-skipping trick) against a full-model reference, errors."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from metasae.lm import LanguageModel, ModelError, _decoder_layers, tiny_model

KINDS = ["llama", "gpt2"]
SPLICE_HOOKS = [
    "blocks.0.hook_resid_pre",
    "blocks.1.hook_resid_pre",
    "blocks.2.hook_resid_post",
    "blocks.3.hook_resid_pre",
]


@pytest.fixture(params=KINDS)
def lm(request, tiny_llama, tiny_gpt2) -> LanguageModel:
    return {"llama": tiny_llama, "gpt2": tiny_gpt2}[request.param]


def _tokens(n: int = 3, t: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def _reference_losses(
    lm: LanguageModel, tokens: torch.Tensor, layer: int, resid: torch.Tensor
) -> torch.Tensor:
    """Full model, no layer skipping: a plain forward_pre_hook replaces the input of decoder layer `layer`."""

    def replace(_mod, args, kwargs):
        if args:
            return (resid.to(lm.dtype), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": resid.to(lm.dtype)}

    handle = _decoder_layers(lm.model)[layer].register_forward_pre_hook(replace, with_kwargs=True)
    try:
        logits = lm.model(tokens, use_cache=False).logits.double()
    finally:
        handle.remove()
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")


def test_token_losses_match_hf_loss(lm):
    tokens = _tokens()
    losses = lm.token_losses(tokens)
    assert losses.shape == (3, 11) and losses.dtype == torch.float32
    with torch.no_grad():
        hf = lm.model(tokens, labels=tokens, use_cache=False).loss
    torch.testing.assert_close(losses.mean(), hf, rtol=1e-5, atol=1e-6)
    # a random model predicts roughly uniformly over 256 bytes
    assert abs(float(losses.mean()) - torch.log(torch.tensor(256.0)).item()) < 0.5


def test_resid_matches_hf_hidden_states(lm):
    tokens = _tokens()
    with torch.no_grad():
        hidden = lm.model(tokens, output_hidden_states=True, use_cache=False).hidden_states
    assert len(hidden) == lm.n_layers + 1
    for layer in range(
        lm.n_layers
    ):  # hidden_states[L] is the input of layer L (the last one is after the norm)
        r = lm.resid(tokens, f"blocks.{layer}.hook_resid_pre")
        assert r.shape == (3, 12, 32)
        torch.testing.assert_close(r, hidden[layer], rtol=0, atol=0)
        if layer > 0:
            assert torch.equal(lm.resid(tokens, f"blocks.{layer - 1}.hook_resid_post"), r)
    last = lm.resid(tokens, "blocks.3.hook_resid_post")  # after the last layer, before the final norm
    final_norm = lm.model.model.norm if hasattr(lm.model, "model") else lm.model.transformer.ln_f
    with torch.no_grad():
        torch.testing.assert_close(final_norm(last), hidden[4], rtol=1e-6, atol=1e-6)
    assert not torch.equal(last, hidden[4])
    assert lm.layer_of("blocks.3.hook_resid_post") == 4 == lm.n_layers


@pytest.mark.parametrize("hook", SPLICE_HOOKS)
def test_splicing_clean_resid_is_a_no_op(lm, hook):
    tokens = _tokens(seed=1)
    with torch.no_grad():
        spliced = lm.token_losses_from(tokens, hook, lm.resid(tokens, hook))
    torch.testing.assert_close(spliced, lm.token_losses(tokens), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("hook", SPLICE_HOOKS)
def test_splicing_perturbed_resid_matches_full_model_reference(lm, hook):
    tokens = _tokens(seed=2)
    clean = lm.resid(tokens, hook)
    g = torch.Generator().manual_seed(3)
    resid = clean + 2 * clean.std() * torch.randn(clean.shape, generator=g)
    with torch.no_grad():
        spliced = lm.token_losses_from(tokens, hook, resid)
        ref = _reference_losses(lm, tokens, lm.layer_of(hook), resid)
    torch.testing.assert_close(spliced.double(), ref, rtol=1e-5, atol=1e-5)
    # the plain whole-model hook (the naive benchmark anchor) agrees with the same reference
    torch.testing.assert_close(lm.token_losses_hooked(tokens, hook, resid).double(), ref, rtol=1e-5, atol=1e-5)
    # the perturbation really changed the losses, so equality above is not trivial
    assert float((spliced - lm.token_losses(tokens)).abs().max()) > 1e-3
    # and the model is whole again afterwards: all layers back, no hook left behind
    assert lm.n_layers == 4
    torch.testing.assert_close(lm.token_losses(tokens), lm.token_losses(tokens.clone()), rtol=0, atol=0)
    assert all(not layer._forward_pre_hooks for layer in _decoder_layers(lm.model))


def test_ce_with_reconstruction_splices_positions_after_the_first(lm):
    from metasae.train import ce_with_reconstruction

    tokens = _tokens(5, 10, seed=6)
    hook = "blocks.1.hook_resid_pre"
    same = ce_with_reconstruction(lm, hook, tokens, lambda x: x, batch_ctx=2)
    clean = float(lm.token_losses(tokens).mean())
    assert same["ce_clean"] == pytest.approx(clean, abs=1e-6)
    assert same["ce_loss"] == pytest.approx(clean, abs=1e-6) and same["ce_delta"] == pytest.approx(
        0, abs=1e-6
    )
    shrink = ce_with_reconstruction(lm, hook, tokens, lambda x: 0.5 * x, batch_ctx=2)
    resid = lm.resid(tokens, hook)
    resid[:, 1:] *= 0.5
    with torch.no_grad():
        want = float(lm.token_losses_from(tokens, hook, resid).mean())
    assert shrink["ce_loss"] == pytest.approx(want, abs=1e-6)
    assert shrink["ce_delta"] == pytest.approx(want - clean, abs=1e-6) and abs(want - clean) > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_wrt_spliced_resid_is_finite_nonzero_and_causal(kind):
    lm = tiny_model(kind, seed=4)
    lm.model.double()  # float64 so the two gradients can be compared tightly
    hook = "blocks.2.hook_resid_pre"
    tokens = _tokens(2, 10, seed=5)
    base = lm.resid(tokens, hook)
    assert base.dtype == torch.float64
    x = base.clone().requires_grad_(True)
    lm.token_losses_from(tokens, hook, x).sum().backward()
    g = x.grad
    assert torch.isfinite(g).all()
    assert bool((g[:, :-1].norm(dim=-1) > 0).all())  # every position that predicts a token gets gradient
    assert float(g[:, -1].abs().max()) == 0.0  # the last position predicts nothing
    x_ref = base.clone().requires_grad_(True)
    _reference_losses(lm, tokens, 2, x_ref).sum().backward()
    torch.testing.assert_close(g, x_ref.grad, rtol=1e-4, atol=1e-7)


def test_concurrent_reads_and_splices_do_not_see_each_others_hooks(tiny_llama):
    """Splicing swaps the model's layer list for a moment: a read in another thread must never see it."""
    import threading

    lm, tokens = tiny_llama, _tokens(2, 12, seed=8)
    ref_resid, ref_loss = lm.resid(tokens, "blocks.1.hook_resid_pre"), lm.token_losses(tokens)
    spliced = 1.5 * lm.resid(tokens, "blocks.2.hook_resid_pre")
    with torch.no_grad():
        ref_spliced = lm.token_losses_from(tokens, "blocks.2.hook_resid_pre", spliced)
    bad: list[str] = []

    def splice():
        for _ in range(60):
            with torch.no_grad():
                out = lm.token_losses_from(tokens, "blocks.2.hook_resid_pre", spliced)
            bad.extend(["splice"] if not torch.equal(out, ref_spliced) else [])

    def read():
        for _ in range(60):
            try:
                bad.extend(
                    ["resid"]
                    if not torch.equal(lm.resid(tokens, "blocks.1.hook_resid_pre"), ref_resid)
                    else []
                )
                bad.extend(["loss"] if not torch.equal(lm.token_losses(tokens), ref_loss) else [])
            except Exception as e:  # a hook of the other thread firing here
                bad.append(type(e).__name__)

    threads = [threading.Thread(target=splice), threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bad == []
    assert lm.n_layers == 4


@pytest.mark.parametrize(
    "hook", ["blocks.1.hook_mlp_out", "resid", "blocks.x.hook_resid_pre", "blocks.-1.hook_resid_pre"]
)
def test_unknown_hook_is_refused(tiny_llama, hook):
    with pytest.raises(ModelError, match="unknown hook") as e:
        tiny_llama.layer_of(hook)
    assert repr(hook) in str(e.value)
    with pytest.raises(ModelError):
        tiny_llama.resid(_tokens(), hook)


@pytest.mark.parametrize(
    "hook", ["blocks.4.hook_resid_pre", "blocks.4.hook_resid_post", "blocks.17.hook_resid_pre"]
)
def test_layer_out_of_range_is_refused(tiny_llama, hook):
    with pytest.raises(ModelError, match="out of range") as e:
        tiny_llama.resid(_tokens(), hook)
    assert "4 layers" in str(e.value)


def test_splicing_after_the_last_layer_and_wrong_shapes_are_refused(tiny_llama):
    tokens = _tokens()
    r = tiny_llama.resid(tokens, "blocks.3.hook_resid_post")
    with pytest.raises(ModelError, match="after the last layer"):
        tiny_llama.token_losses_from(tokens, "blocks.3.hook_resid_post", r)
    r = tiny_llama.resid(tokens, "blocks.1.hook_resid_pre")
    with pytest.raises(ModelError, match="does not match tokens"):
        tiny_llama.token_losses_from(tokens[:, :-1], "blocks.1.hook_resid_pre", r)
    assert tiny_llama.n_layers == 4  # nothing was left half-spliced


def _save_with_byte_tokenizer(lm: LanguageModel, folder) -> None:
    """Save a tiny model as a Hugging Face folder, with a fast tokenizer mapping each byte to its own id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i) if chr(i).isprintable() else f"<{i}>": i for i in range(256)}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    lm.model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(folder)


def test_load_a_local_folder_also_through_home(tmp_path, monkeypatch):
    tiny = tiny_model("gpt2", seed=3)
    _save_with_byte_tokenizer(tiny, tmp_path / "m")
    monkeypatch.setenv("HOME", str(tmp_path))
    tokens = _tokens(2, 8, seed=7)
    for name in (str(tmp_path / "m"), "~/m"):
        lm = LanguageModel.load(name)
        assert lm.name == name and (lm.n_layers, lm.d_model) == (4, 32)
        assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
        assert lm.tokenizer("abc")["input_ids"] == [97, 98, 99]
        torch.testing.assert_close(lm.token_losses(tokens), tiny.token_losses(tokens), rtol=0, atol=1e-6)
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="cannot load model") as e:
        LanguageModel.load(str(tmp_path / "m"))
    assert str(tmp_path / "m") in str(e.value)
    with pytest.raises(ModelError, match="does not exist"):
        LanguageModel.load("~/missing")


@pytest.mark.parametrize("name", ["/nonexistent", "/nonexistent/model.gguf", "./no_such_model_folder"])
def test_unknown_model_path_is_refused(name):
    with pytest.raises(ModelError) as e:
        LanguageModel.load(name)
    assert name in str(e.value) and "does not exist" in str(e.value)


def test_tiny_model_kinds_and_byte_tokenizer():
    with pytest.raises(ModelError, match="unknown tiny model kind"):
        tiny_model("bert")
    lm = tiny_model("gpt2", seed=1)
    assert (lm.n_layers, lm.d_model) == (4, 32)
    assert lm.unembed().shape == (32, 256)
    ids = lm.tokenizer("héllo\n")["input_ids"]
    assert ids == list("héllo\n".encode()) and ids[-1] == lm.tokenizer.eos_token_id
    assert lm.tokenizer.decode(ids) == "héllo\n"
    assert lm.decode_tokens([104, 105]) == ["h", "i"]
    # same seed -> same weights; another seed -> other weights
    assert torch.equal(tiny_model("gpt2", seed=1).unembed(), lm.unembed())
    assert not torch.equal(tiny_model("gpt2", seed=2).unembed(), lm.unembed())


SMOLLM2_TEXT = (
    "Albert Einstein was a German-born theoretical physicist who is widely held to be one of the greatest "
    "and most influential scientists of all time. Best known for developing the theory of relativity, he "
    "also made important contributions to quantum mechanics. The city of Paris is the capital of France "
    "and one of the most visited places in the world, famous for its museums, its food and the Eiffel "
    "Tower, which was built for the World's Fair in 1889."
)


@pytest.mark.slow
def test_smollm2_resid_splice_and_real_text_loss(smollm2):
    ids = smollm2.tokenizer(SMOLLM2_TEXT)["input_ids"]
    assert len(ids) >= 64
    tokens = torch.tensor(ids[:64]).view(2, 32)
    hook = "blocks.15.hook_resid_pre"
    resid = smollm2.resid(tokens, hook)
    assert resid.shape == (2, 32, 576) and smollm2.d_model == 576 and smollm2.n_layers == 30
    clean = smollm2.token_losses(tokens)
    with torch.no_grad():
        spliced = smollm2.token_losses_from(tokens, hook, resid)
    torch.testing.assert_close(spliced, clean, rtol=0, atol=1e-4)
    shuffled_ids = ids[:64]
    random.Random(0).shuffle(shuffled_ids)
    shuffled = smollm2.token_losses(torch.tensor(shuffled_ids).view(2, 32))
    assert float(clean.mean()) < 4.0  # a real LM on plain English
    assert float(clean.mean()) + 2.0 < float(shuffled.mean())
