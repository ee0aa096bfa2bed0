"""metasae.intervene against a brute-force hook: a whole-model forward whose forward pre-hook on the decoder layer
edits the residual with the formula written out by hand (no helper of the module under test)."""

from __future__ import annotations

import math

import pytest
import torch

from metasae.intervene import Edit, InterventionError, Setup, intervene
from metasae.lm import _decoder_layers

HOOK, LAYER, L, FIRE = "blocks.1.hook_resid_pre", 1, 5, 11
PROMPT = [72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]  # "Hello world" as bytes


@pytest.fixture(scope="module")
def setup(tiny_llama, make_sae):
    sae = make_sae(32, 64, seed=1, hook_name=HOOK)
    sae.b_enc[L] = 3.0  # latent L fires strongly everywhere: edits move the logits well above float noise
    sae.b_enc[7] = -50.0  # latent 7 never fires
    pre = (tiny_llama.resid(torch.tensor([PROMPT]), HOOK)[0] @ sae.W_enc[:, FIRE])[1:]
    sae.b_enc[FIRE] = -float(pre.median()) + 1e-6  # latent FIRE fires on about half of the tokens
    meta = make_sae(32, 16, seed=2)
    return Setup(lm=tiny_llama, hook=HOOK, sae=sae, meta=meta, meta_labels=[f"m{i}" for i in range(16)])


def hooked_logp(lm, tokens: list[int], edit_fn) -> torch.Tensor:
    """Last-position log-probs of a plain forward whose pre-hook on layer LAYER replaces x by edit_fn(x)."""
    def pre(_mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        y = edit_fn(x[0].clone())[None]
        return ((y, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": y})

    h = _decoder_layers(lm.model)[LAYER].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            return torch.log_softmax(lm.model(torch.tensor([tokens])).logits[0, -1].float(), -1)
    finally:
        h.remove()


def acts(sae, x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x @ sae.W_enc + sae.b_enc)  # random_sae: plain ReLU, no b_dec on the input


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    return float((p_log.exp() * (p_log - q_log)).sum())


def check(result: dict, clean: torch.Tensor, edited: torch.Tensor, i: int = 0) -> None:
    e = result["edits"][i]
    assert e["kl"] == pytest.approx(kl(clean, edited), rel=1e-3, abs=1e-6)
    assert e["kl"] > 1e-4  # the edit did something measurable
    top = edited.topk(5)
    assert [t["id"] for t in e["top"][:5]] == top.indices.tolist()
    assert [t["prob"] for t in e["top"][:5]] == pytest.approx(top.values.exp().tolist(), abs=1e-5)
    for t in e["targets"]:
        assert t["logp_clean"] == pytest.approx(float(clean[t["id"]]), abs=1e-4)
        assert t["logp_edited"] == pytest.approx(float(edited[t["id"]]), abs=1e-4)


def test_ablation_matches_a_brute_force_hook(setup):
    sae = setup.sae

    def ablate(x):
        a = acts(sae, x)[:, L]
        x[1:] -= a[1:, None] * sae.W_dec[L]
        return x

    r = intervene(setup, PROMPT, L, [Edit("ablate")], targets=["o", "!"], top_k=5)
    clean, edited = hooked_logp(setup.lm, PROMPT, lambda x: x), hooked_logp(setup.lm, PROMPT, ablate)
    check(r, clean, edited)
    assert [t["id"] for t in r["clean"]["top"]] == clean.topk(5).indices.tolist()
    assert r["edits"][0]["positions"] == list(range(1, len(PROMPT)))  # L fires everywhere; position 0 is kept
    assert [t["id"] for t in r["targets"]] == [ord("o"), ord("!")]
    # ablating only where L fires is the same edit (its contribution is zero elsewhere)
    again = intervene(setup, PROMPT, L, [Edit("ablate")], positions="fires", targets=["o"])
    assert again["edits"][0]["kl"] == pytest.approx(r["edits"][0]["kl"], rel=1e-6)


def test_removing_a_meta_latent_matches_the_hand_formula(setup):
    sae, meta = setup.sae, setup.meta
    d = sae.W_dec[L]
    w = torch.relu((d / d.norm()) @ meta.W_enc + meta.b_enc)  # the meta-SAE's weights of L's unit row
    active = torch.nonzero(w > 0).flatten().tolist()
    assert len(active) >= 2
    m, m2 = active[0], active[1]

    def remove(x):
        a = acts(sae, x)[:, L]
        x[1:] += a[1:, None] * d.norm() * ((0.0 - 1) * w[m] * meta.W_dec[m] + (0.5 - 1) * w[m2] * meta.W_dec[m2])
        return x

    edit = Edit("meta", meta_scales={m: 0.0, m2: 0.5})
    r = intervene(setup, PROMPT, L, [Edit("ablate"), edit], targets=["o"])
    check(r, hooked_logp(setup.lm, PROMPT, lambda x: x), hooked_logp(setup.lm, PROMPT, remove), i=1)
    dec = {x["meta_latent"]: x for x in r["edits"][1]["decomposition"]}
    assert sorted(dec) == active and dec[m]["scale"] == 0.0 and dec[m2]["scale"] == 0.5
    assert dec[m]["weight"] == pytest.approx(float(w[m]), rel=1e-5) and dec[m]["label"] == f"m{m}"
    assert r["edits"][1]["name"] == f"remove meta {m}, ×0.5 meta {m2}" if m < m2 else True
    # scale 1 keeps the weight: nothing changes
    same = intervene(setup, PROMPT, L, [Edit("meta", meta_scales={m: 1.0})])
    assert same["edits"][0]["kl"] == 0.0 and same["edits"][0]["edit_norm"] == 0.0


def test_steering_where_another_latent_fires_matches_the_hook(setup):
    sae, meta = setup.sae, setup.meta
    fire = FIRE
    assert 0 < int((acts(sae, setup.lm.resid(torch.tensor([PROMPT]), HOOK)[0])[1:, fire] > 0).sum()) < len(PROMPT) - 1
    e_m = meta.W_dec[3] / meta.W_dec[3].norm()

    def steer(x):
        on = acts(sae, x)[:, fire] > 0
        on[0] = False
        x[on] += 4.0 * e_m
        return x

    r = intervene(setup, PROMPT, L, [Edit("steer", steer_meta=3, coef=4.0)], positions="fires", fire_latent=fire)
    check(r, hooked_logp(setup.lm, PROMPT, lambda x: x), hooked_logp(setup.lm, PROMPT, steer))
    assert r["edits"][0]["edit_norm"] == pytest.approx(4.0, rel=1e-5)
    # steering along a latent: its unit decoder row
    u = sae.W_dec[9] / sae.W_dec[9].norm()

    def steer_latent(x):
        x[1:] += -2.5 * u
        return x

    r = intervene(setup, PROMPT, L, [Edit("steer", steer_latent=9, coef=-2.5)])
    check(r, hooked_logp(setup.lm, PROMPT, lambda x: x), hooked_logp(setup.lm, PROMPT, steer_latent))


def test_a_latent_that_never_fires_changes_nothing(setup):
    r = intervene(setup, PROMPT, 7, [Edit("ablate")])
    assert r["edits"][0]["kl"] == 0.0 and r["edits"][0]["n_positions"] == len(PROMPT) - 1
    r = intervene(setup, PROMPT, L, [Edit("steer", coef=1.0)], positions="fires", fire_latent=7)
    assert r["edits"][0]["n_positions"] == 0 and r["edits"][0]["kl"] == 0.0


def test_greedy_continuations(setup):
    lm = setup.lm
    r = intervene(setup, PROMPT, L, [Edit("steer", steer_latent=9, coef=50.0)], max_new_tokens=4)
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(4):
            ids.append(int(lm.model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert r["clean"]["continuation"] == lm.tokenizer.decode(ids[len(PROMPT):])
    u = setup.sae.W_dec[9] / setup.sae.W_dec[9].norm()
    ids = list(PROMPT)
    for _ in range(4):
        ids.append(int(hooked_logp(lm, ids, lambda x: torch.cat([x[:1], x[1:] + 50.0 * u])).argmax()))
    assert r["edits"][0]["continuation"] == lm.tokenizer.decode(ids[len(PROMPT):])


@pytest.mark.parametrize("kwargs, field", [
    ({"latent": 64}, "latent"),
    ({"tokens": [72]}, "prompt"),
    ({"targets": [""]}, "targets[0]"),
    ({"edits": []}, "edits"),
    ({"edits": [Edit("meta")]}, "edits[0].meta_scales"),
    ({"edits": [Edit("ablate"), Edit("meta", meta_scales={99: 0.0})]}, "edits[1].meta_scales"),
    ({"edits": [Edit("steer", steer_meta=16)]}, "edits[0].steer_meta"),
    ({"edits": [Edit("steer", coef=math.inf)]}, "edits[0].coef"),
    ({"edits": [Edit("rotate")]}, "edits[0].kind"),
    ({"positions": "some"}, "positions"),
    ({"fire_latent": -1}, "fire_latent"),
])
def test_bad_input_names_the_field(setup, kwargs, field):
    args = {"tokens": PROMPT, "latent": L, "edits": [Edit("ablate")]} | kwargs
    with pytest.raises(InterventionError) as e:
        intervene(setup, args.pop("tokens"), args.pop("latent"), args.pop("edits"), **args)
    assert e.value.field == field and str(e.value).startswith(f"{field}: ")


def test_a_meta_latent_outside_the_decomposition_is_refused_with_the_active_ones(setup):
    w = torch.relu((setup.sae.W_dec[L] / setup.sae.W_dec[L].norm()) @ setup.meta.W_enc + setup.meta.b_enc)
    inactive = int(torch.nonzero(w == 0).flatten()[0])
    with pytest.raises(InterventionError, match=r"not in latent 5's decomposition .* its meta-latents are \["):
        intervene(setup, PROMPT, L, [Edit("meta", meta_scales={inactive: 0.0})])
