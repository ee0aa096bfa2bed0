"""metasae.sae: the weights container, its round trips through sae-lens's on-disk format, and its refusals."""

from __future__ import annotations

import json

import pytest
import torch

from metasae.sae import SAE_CFG, SAE_WEIGHTS, Sae, SaeError, check_pair

HOOK = "blocks.1.hook_resid_pre"


def _inputs(d: int, n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _reference_encode(sae: Sae, x: torch.Tensor) -> torch.Tensor:
    """The documented formula written out independently of Sae.encode."""
    pre = (x - sae.b_dec * sae.apply_b_dec_to_input) @ sae.W_enc + sae.b_enc
    acts = torch.relu(pre)
    if sae.threshold is not None:
        acts = torch.where(pre > sae.threshold, acts, torch.zeros_like(acts))
    return acts


@pytest.mark.parametrize("jumprelu", [False, True])
@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_encode_decode_follow_the_formula(make_sae, jumprelu, apply_b_dec):
    sae = make_sae(12, 20, seed=3, jumprelu=jumprelu, apply_b_dec_to_input=apply_b_dec)
    x = _inputs(12)
    acts = sae.encode(x)
    torch.testing.assert_close(acts, _reference_encode(sae, x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sae.decode(acts), acts @ sae.W_dec + sae.b_dec, rtol=1e-6, atol=1e-6)
    frac = float((acts > 0).float().mean())
    assert 0.05 < frac < 0.95, (
        frac
    )  # the random SAE is neither dead nor dense, so the comparison means something
    if jumprelu:  # thresholds must actually remove some positive pre-activations
        pre = sae.pre_acts(x)
        assert bool(((pre > 0) & (pre <= sae.threshold)).any())
        assert (acts > 0).sum() < (pre > 0).sum()


@pytest.mark.parametrize("jumprelu", [False, True])
def test_folded_encodes_the_same_without_b_dec_on_the_input(make_sae, jumprelu):
    sae = make_sae(12, 20, seed=5, jumprelu=jumprelu, apply_b_dec_to_input=True)
    with torch.no_grad():
        sae.b_dec.mul_(0).add_(torch.linspace(-3, 3, 12))  # large enough that forgetting it changes the codes
    folded = sae.folded()
    assert not folded.apply_b_dec_to_input and folded.folded() is folded
    x = _inputs(12)
    torch.testing.assert_close(folded.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
    unfolded = Sae(**{**sae.__dict__, "apply_b_dec_to_input": False})
    assert not torch.allclose(unfolded.encode(x), sae.encode(x), atol=1e-3)  # the fold is what keeps them equal
    torch.testing.assert_close(folded.W_dec, sae.W_dec)
    torch.testing.assert_close(folded.b_dec, sae.b_dec)


@pytest.mark.parametrize("jumprelu", [False, True])
@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_ours_saved_loads_in_sae_lens_with_identical_outputs(tmp_path, make_sae, jumprelu, apply_b_dec):
    from sae_lens import SAE

    sae = make_sae(12, 20, seed=5, jumprelu=jumprelu, apply_b_dec_to_input=apply_b_dec)
    sae.model_name = "tiny-llama-0"
    out = sae.save(tmp_path / "sae")
    assert out == tmp_path / "sae"
    assert sorted(p.name for p in out.iterdir()) == sorted([SAE_CFG, SAE_WEIGHTS])
    assert not (tmp_path / "sae.tmp").exists()

    theirs = SAE.load_from_disk(out, device="cpu")
    assert theirs.cfg.architecture() == ("jumprelu" if jumprelu else "standard")
    assert theirs.cfg.metadata.hook_name == HOOK
    assert theirs.cfg.metadata.model_name == "tiny-llama-0"
    assert theirs.cfg.d_in == 12 and theirs.cfg.d_sae == 20
    x = _inputs(12)
    with torch.no_grad():
        a_theirs = theirs.encode(x)
        torch.testing.assert_close(a_theirs, sae.encode(x), rtol=0, atol=0)
        torch.testing.assert_close(theirs.decode(a_theirs), sae.decode(a_theirs), rtol=0, atol=0)

    back = Sae.load(out)  # and our loader reads our own files back bit for bit
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(sae, name)), name
    assert (back.threshold is None) == (not jumprelu)
    if jumprelu:
        assert torch.equal(back.threshold, sae.threshold)
    assert back.apply_b_dec_to_input == apply_b_dec
    assert back.hook_name == HOOK and back.model_name == "tiny-llama-0"
    assert back.metadata["source"] == str(out)


def test_save_overwrites_an_existing_folder(tmp_path, make_sae):
    a, b = make_sae(8, 10, seed=1), make_sae(8, 10, seed=2)
    a.save(tmp_path / "s")
    b.save(tmp_path / "s")
    assert torch.equal(Sae.load(tmp_path / "s").W_dec, b.W_dec)


def test_half_precision_save_rounds_weights_to_fp16(tmp_path, make_sae):
    sae = make_sae(8, 10, seed=4)
    back = Sae.load(sae.save(tmp_path / "h", dtype="float16"))
    assert back.W_enc.dtype == torch.float32  # loaded as fp32
    torch.testing.assert_close(back.W_enc, sae.W_enc.half().float(), rtol=0, atol=0)


def _sae_lens_random(cls_name: str, d_in: int, d_sae: int, seed: int, apply_b_dec: bool):
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    cfg_cls = getattr(sae_lens, cls_name + "Config")
    model = getattr(sae_lens, cls_name)(
        cfg_cls(
            d_in=d_in,
            d_sae=d_sae,
            apply_b_dec_to_input=apply_b_dec,
            metadata=SAEMetadata(hook_name=HOOK, model_name="m"),
        )
    )
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in model.state_dict().items()}
    if "threshold" in sd:
        sd["threshold"] = sd["threshold"].abs()
    model.load_state_dict(sd)
    return model


@pytest.mark.parametrize("cls_name", ["StandardSAE", "JumpReLUSAE"])
@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_sae_lens_saved_loads_with_identical_outputs(tmp_path, cls_name, apply_b_dec):
    theirs = _sae_lens_random(cls_name, 12, 24, seed=7, apply_b_dec=apply_b_dec)
    theirs.save_model(tmp_path / "theirs")
    ours = Sae.load(tmp_path / "theirs")
    assert ours.architecture == ("jumprelu" if cls_name == "JumpReLUSAE" else "standard")
    assert ours.apply_b_dec_to_input == apply_b_dec
    assert ours.hook_name == HOOK and ours.model_name == "m"
    assert (ours.width, ours.d_in) == (24, 12)
    x = _inputs(12, seed=9)
    with torch.no_grad():
        a = theirs.encode(x)
        assert 0 < int((a > 0).sum()) < a.numel()
        torch.testing.assert_close(ours.encode(x), a, rtol=0, atol=0)
        torch.testing.assert_close(ours.decode(a), theirs.decode(a), rtol=0, atol=0)


@pytest.mark.parametrize("rescale", [False, True])
def test_sae_lens_topk_loads_with_identical_outputs(tmp_path, rescale):
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    cfg = TopKSAEConfig(
        d_in=12, d_sae=24, k=3, rescale_acts_by_decoder_norm=rescale, metadata=SAEMetadata(hook_name=HOOK)
    )
    theirs = TopKSAE(cfg)
    g = torch.Generator().manual_seed(8)
    theirs.load_state_dict({k: torch.randn(v.shape, generator=g) for k, v in theirs.state_dict().items()})
    assert not torch.allclose(theirs.W_dec.norm(dim=1), torch.ones(24))  # so the rescaling matters
    theirs.save_model(tmp_path / "topk")
    ours = Sae.load(tmp_path / "topk")
    assert ours.architecture == "topk" and ours.k == 3 and not ours.per_latent
    x = _inputs(12, seed=4)
    with torch.no_grad():
        a_theirs = theirs.encode(x)
        a_ours = ours.encode(x)
        assert bool(((a_ours > 0).sum(1) <= 3).all())
        assert torch.equal(a_ours > 0, a_theirs > 0)
        torch.testing.assert_close(ours.decode(a_ours), theirs.decode(a_theirs), rtol=1e-5, atol=1e-5)
        if not rescale:
            torch.testing.assert_close(a_ours, a_theirs, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(make_sae, name, bad):
    sae = make_sae(6, 9, seed=1, jumprelu=True)
    tensors = {
        k: getattr(sae, k).contiguous().clone() for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
    }
    tensors[name].view(-1)[3] = bad
    tensors[name].view(-1)[4] = bad
    with pytest.raises(SaeError, match=rf"^{name} holds 2 non-finite"):
        Sae(**tensors)


def test_non_finite_weights_on_disk_name_the_tensor_and_the_folder(tmp_path):
    theirs = _sae_lens_random("StandardSAE", 6, 9, seed=2, apply_b_dec=False)
    with torch.no_grad():
        theirs.b_dec[2] = float("nan")
    theirs.save_model(tmp_path / "nan_sae")
    with pytest.raises(SaeError, match=r"b_dec holds 1 non-finite") as e:
        Sae.load(tmp_path / "nan_sae")
    assert str(tmp_path / "nan_sae") in str(e.value)


@pytest.mark.parametrize(
    "change, name",
    [
        (lambda t: t.update(W_enc=t["W_enc"].T.contiguous()), "W_enc"),
        (lambda t: t.update(b_enc=t["b_enc"][:-1]), "b_enc"),
        (lambda t: t.update(b_dec=torch.zeros(7)), "b_dec"),
        (lambda t: t.update(threshold=torch.zeros(9, 1)), "threshold"),
        (lambda t: t.update(W_dec=t["W_dec"].reshape(-1)), "W_dec"),
    ],
)
def test_wrong_shapes_are_refused_naming_the_tensor(make_sae, change, name):
    sae = make_sae(6, 9, seed=1, jumprelu=True)
    tensors = {k: getattr(sae, k) for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
    change(tensors)
    with pytest.raises(SaeError, match=rf"^{name} (has shape|must be)"):
        Sae(**tensors)


def test_missing_folder_is_refused_naming_the_path(tmp_path):
    missing = tmp_path / "no_such_sae"
    with pytest.raises(SaeError, match="does not exist") as e:
        Sae.load(missing)
    assert str(missing) in str(e.value)


@pytest.mark.parametrize("drop", [SAE_CFG, SAE_WEIGHTS])
def test_missing_file_is_refused_naming_the_path_and_file(tmp_path, make_sae, drop):
    path = make_sae(6, 9).save(tmp_path / "s")
    (path / drop).unlink()
    with pytest.raises(SaeError) as e:
        Sae.load(path)
    assert str(path) in str(e.value) and drop in str(e.value)


def test_corrupt_cfg_is_refused_naming_the_path(tmp_path, make_sae):
    path = make_sae(6, 9).save(tmp_path / "s")
    (path / SAE_CFG).write_text("{not json")
    with pytest.raises(SaeError, match="cannot load SAE from") as e:
        Sae.load(path)
    assert str(path) in str(e.value)


def test_unsupported_normalisation_is_refused(tmp_path, make_sae):
    path = make_sae(6, 9).save(tmp_path / "s")
    cfg = json.loads((path / SAE_CFG).read_text())
    cfg["normalize_activations"] = "expected_average_only_in"
    (path / SAE_CFG).write_text(json.dumps(cfg))
    with pytest.raises(SaeError, match="normalize_activations"):
        Sae.load(path)


def test_check_pair_different_d_in_names_both(make_sae):
    a, b = make_sae(6, 9), make_sae(8, 18)
    with pytest.raises(SaeError, match="different d_in") as e:
        check_pair(a, b)
    msg = str(e.value)
    assert "6 (width 9)" in msg and "8 (width 18)" in msg


def test_check_pair_different_hooks_names_both(make_sae):
    a = make_sae(6, 9, hook_name="blocks.1.hook_resid_pre")
    b = make_sae(6, 18, hook_name="blocks.2.hook_resid_pre")
    with pytest.raises(SaeError, match="different hooks") as e:
        check_pair(a, b)
    assert "'blocks.1.hook_resid_pre'" in str(e.value) and "'blocks.2.hook_resid_pre'" in str(e.value)


def test_check_pair_accepts_compatible_and_refuses_topk(make_sae):
    a, b = make_sae(6, 9), make_sae(6, 18, jumprelu=True)
    check_pair(a, b)  # same d_in and hook: fine
    b.hook_name = ""
    check_pair(a, b)  # an unknown hook is not a mismatch
    topk = make_sae(6, 18)
    topk.k = 2
    assert topk.architecture == "topk" and not topk.per_latent
    with pytest.raises(SaeError, match="TopK"):
        check_pair(a, topk)


def test_topk_keeps_exactly_k_largest(make_sae):
    sae = make_sae(6, 18, seed=3)
    sae.k = 3
    x = _inputs(6)
    acts = sae.encode(x)
    relu = torch.relu(sae.pre_acts(x))
    assert bool(((acts > 0).sum(1) <= 3).all())
    top = relu.topk(3, dim=1)
    torch.testing.assert_close(acts.gather(1, top.indices), top.values)


def test_to_changes_dtype_of_every_tensor_and_keeps_values(make_sae):
    sae = make_sae(6, 9, jumprelu=True)
    d = sae.to(dtype=torch.float64)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        assert getattr(d, name).dtype == torch.float64
        assert torch.equal(getattr(d, name).float(), getattr(sae, name))
    assert d.hook_name == sae.hook_name
    u = sae.unit_decoder()
    torch.testing.assert_close(u.norm(dim=1), torch.ones(9))
    torch.testing.assert_close(u * sae.W_dec.norm(dim=1, keepdim=True), sae.W_dec)


def test_evaluate_sae_matches_hand_computed_statistics(make_sae):
    from metasae.train import evaluate_sae

    sae = make_sae(6, 9, seed=2, dtype=torch.float64)
    sae.b_enc[4] = -100.0  # a dead latent
    x = _inputs(6, n=50, seed=3).double() * 2 + 1
    ev = evaluate_sae(sae, x, chunk=7)
    acts = _reference_encode(sae, x)
    err = ((x - (acts @ sae.W_dec + sae.b_dec)) ** 2).sum()
    assert ev["l0"] == pytest.approx(float((acts > 0).sum()) / 50, rel=1e-12)
    assert ev["mse"] == pytest.approx(float(err) / 50, rel=1e-6)  # evaluate_sae reads activations as fp32
    assert ev["fvu"] == pytest.approx(float(err / ((x - x.mean(0)) ** 2).sum()), rel=1e-6)
    assert ev["dead_frac"] == pytest.approx(1 / 9)
    with pytest.raises(SaeError, match="do not match SAE d_in 6"):
        evaluate_sae(sae, torch.zeros(5, 7))
