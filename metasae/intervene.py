"""Causal edits with latents and meta-latents: ablate a latent, remove or scale meta-latents inside its
contribution, or steer along a latent or meta-latent direction; compare next-token distributions.

The residual stream at the atlas's hook is read once (`LanguageModel.resid`), edited, and spliced back
(`LanguageModel._from_layer`, the layer-skipping splice of `token_losses_from`), so an edit costs the layers
after the hook. Edits keep the SAE's reconstruction error: they change the *actual* residual by the edit's
vector, they never replace it with the SAE's reconstruction.

With a_L(t) the activation of latent L at token t, d_L its decoder row and u_L = d_L / ||d_L|| (what the
meta-SAE decomposes: u_L ≈ Σ_m w_m e_m + b, e_m the meta-SAE's decoder rows):

- ``ablate``: x_t -= a_L(t) d_L
- ``meta``:   x_t += a_L(t) ||d_L|| Σ_m (s_m - 1) w_m e_m  (meta-latent m's weight in L scaled by s_m; s_m = 0 removes it)
- ``steer``:  x_t += coef · (unit direction of latent `steer_latent`, or of meta-latent `steer_meta`)

at the chosen positions: every token, or the tokens where a chosen latent fires. Position 0 is never edited
(the attention sink: its norm is ~100x the others', and the atlas leaves it out everywhere).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from metasae.lm import LanguageModel
from metasae.sae import Sae

KINDS = ("ablate", "meta", "steer")
POSITIONS = ("all", "fires")


class InterventionError(ValueError):
    """A request that cannot be run; `field` names the input at fault (`edits[0].meta_scales`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Edit:
    """One edit of latent L's contribution (see the module docstring for the formulas)."""

    kind: str
    meta_scales: dict[int, float] = field(default_factory=dict)  # meta: meta-latent -> factor on its weight
    steer_latent: int | None = None  # steer: a latent of the same width (default: L itself)
    steer_meta: int | None = None  # steer: a meta-latent direction instead of a latent's
    coef: float = 0.0  # steer: coefficient on the unit direction (residual-norm units)
    name: str = ""

    def title(self, latent: int) -> str:
        if self.name:
            return self.name
        if self.kind == "ablate":
            return f"ablate latent {latent}"
        if self.kind == "meta":
            parts = [("remove" if s == 0 else f"×{s:g}") + f" meta {m}" for m, s in sorted(self.meta_scales.items())]
            return ", ".join(parts) or "meta (no change)"
        what = f"meta {self.steer_meta}" if self.steer_meta is not None else f"latent {self.steer_latent or latent}"
        return f"steer {what} × {self.coef:g}"


@dataclass
class Setup:
    """What an edit needs besides the text: the model, the hook, one SAE of the ladder and the meta-SAE."""

    lm: LanguageModel
    hook: str
    sae: Sae
    meta: Sae | None = None
    meta_labels: Sequence[str] | np.ndarray = ()  # by meta-latent id; the backend keeps an object array


# ------------------------------------------------------------------------------------------------ pieces


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp_min(1e-12)


@torch.no_grad()
def meta_weights(meta: Sae, direction: torch.Tensor) -> torch.Tensor:
    """Meta-SAE activations (n_meta,) of one direction, scaled to unit norm first (as the atlas decomposes rows)."""
    u = unit(direction.float()).to(meta.W_enc.device, meta.W_enc.dtype)
    return meta.encode(u[None])[0].float()


def edit_positions(acts_fire: torch.Tensor | None, seq: int, positions: str) -> torch.Tensor:
    """Boolean mask (seq,) of the tokens an edit touches: all but position 0, or where the chosen latent fires."""
    mask = torch.ones(seq, dtype=torch.bool)
    if positions == "fires":
        assert acts_fire is not None
        mask = acts_fire.detach().cpu() > 0
    mask[0] = False
    return mask


@torch.no_grad()
def edit_delta(setup: Setup, x: torch.Tensor, latent: int, edit: Edit, mask: torch.Tensor) -> torch.Tensor:
    """The change (seq, d_model) an edit makes to one sequence's residual `x` (seq, d_model)."""
    sae, meta = setup.sae, setup.meta
    delta = torch.zeros_like(x, dtype=torch.float32)
    m = mask.to(x.device)
    if edit.kind in ("ablate", "meta"):
        a = sae.encode(x.to(sae.W_enc.device))[:, latent].float().to(x.device)  # (seq,)
        d = sae.W_dec[latent].float().to(x.device)
        if edit.kind == "ablate":
            vec = -d
        else:
            assert meta is not None
            w = meta_weights(meta, d)
            ids = torch.tensor(sorted(edit.meta_scales), dtype=torch.long)
            s = torch.tensor([edit.meta_scales[int(i)] for i in ids], dtype=torch.float32)
            change = ((s - 1) * w[ids].cpu())[:, None] * meta.W_dec[ids.to(meta.W_dec.device)].float().cpu()
            vec = d.norm() * change.sum(0).to(x.device)
        delta[m] = a[m, None] * vec[None]
    elif edit.kind == "steer":
        if edit.steer_meta is not None:
            assert meta is not None
            direction = meta.W_dec[edit.steer_meta]
        else:
            direction = sae.W_dec[latent if edit.steer_latent is None else edit.steer_latent]
        delta[m] = edit.coef * unit(direction.float()).to(x.device)[None]
    else:
        raise InterventionError("kind", f"unknown edit {edit.kind!r} (one of {', '.join(KINDS)})")
    return delta


@torch.no_grad()
def logits_from(lm: LanguageModel, tokens: torch.Tensor, hook: str, resid: torch.Tensor) -> torch.Tensor:
    """Logits (batch, seq, vocab) of the model with `resid` spliced in at `hook` (layers before it skipped)."""
    layer = lm.layer_of(hook)
    tokens = tokens.to(lm.device)
    # the same splice token_losses_from uses (tested there against a whole-model hook), returning logits
    with lm._lock, lm._from_layer(layer, resid.to(lm.device)):
        return lm.model(tokens, use_cache=False).logits.float()


def _check(setup: Setup, latent: int, edits: Sequence[Edit], positions: str, fire_latent: int | None) -> None:
    width = setup.sae.width
    if not 0 <= latent < width:
        raise InterventionError("latent", f"{latent} is out of range: width {width} has latents 0..{width - 1}")
    if positions not in POSITIONS:
        raise InterventionError("positions", f"must be one of {', '.join(POSITIONS)}, got {positions!r}")
    if fire_latent is not None and not 0 <= fire_latent < width:
        raise InterventionError("fire_latent", f"{fire_latent} is out of range: width {width} has latents "
                                               f"0..{width - 1}")
    if not edits:
        raise InterventionError("edits", "give at least one edit")
    n_meta = setup.meta.width if setup.meta is not None else 0
    for i, e in enumerate(edits):
        where = f"edits[{i}]"
        if e.kind not in KINDS:
            raise InterventionError(f"{where}.kind", f"must be one of {', '.join(KINDS)}, got {e.kind!r}")
        if (e.kind == "meta" or e.steer_meta is not None) and setup.meta is None:
            raise InterventionError(f"{where}.kind", "this atlas has no meta-SAE")
        if e.kind == "meta":
            if not e.meta_scales:
                raise InterventionError(f"{where}.meta_scales", "name at least one meta-latent to scale")
            assert setup.meta is not None  # refused just above
            w = meta_weights(setup.meta, setup.sae.W_dec[latent])
            for m, s in e.meta_scales.items():
                if not 0 <= m < n_meta:
                    raise InterventionError(f"{where}.meta_scales", f"meta-latent {m} is out of range 0..{n_meta - 1}")
                if not math.isfinite(s):
                    raise InterventionError(f"{where}.meta_scales", f"the scale of meta-latent {m} is not finite")
                if float(w[m]) <= 0:
                    active = [int(j) for j in torch.nonzero(w > 0).flatten()]
                    raise InterventionError(f"{where}.meta_scales",
                                            f"meta-latent {m} is not in latent {latent}'s decomposition (weight 0): "
                                            f"scaling it changes nothing; its meta-latents are {active}")
        if e.kind == "steer":
            if e.steer_meta is not None and not 0 <= e.steer_meta < n_meta:
                raise InterventionError(f"{where}.steer_meta", f"{e.steer_meta} is out of range 0..{n_meta - 1}")
            if e.steer_latent is not None and not 0 <= e.steer_latent < width:
                raise InterventionError(f"{where}.steer_latent", f"{e.steer_latent} is out of range: width {width} "
                                                                 f"has latents 0..{width - 1}")
            if not math.isfinite(e.coef):
                raise InterventionError(f"{where}.coef", "must be finite")


def target_ids(lm: LanguageModel, targets: Sequence[str]) -> list[tuple[str, int, int]]:
    """(text, first token id, number of tokens) of each target string; a target with no tokens is refused."""
    from metasae.corpus import _encode

    out = []
    for i, t in enumerate(targets):
        ids = _encode(lm.tokenizer, [t])[0] if t else []
        if not ids:
            raise InterventionError(f"targets[{i}]", f"{t!r} gives no tokens")
        out.append((t, int(ids[0]), len(ids)))
    return out


def _top(logp: torch.Tensor, lm: LanguageModel, k: int) -> list[dict[str, Any]]:
    v, i = logp.topk(min(k, logp.shape[-1]))
    toks = lm.decode_tokens(i.tolist())
    return [{"token": t, "id": int(j), "prob": float(math.exp(x))} for t, j, x in zip(toks, i.tolist(), v.tolist(),
                                                                                    strict=True)]


# ------------------------------------------------------------------------------------------------ the run


@torch.no_grad()
def edited_resid(setup: Setup, x: torch.Tensor, latent: int, edit: Edit | None, positions: str,
                 fire_latent: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(edited residual (seq, d), positions mask) for one sequence's residual `x` (seq, d)."""
    fire = None
    if positions == "fires":
        fl = latent if fire_latent is None else fire_latent
        fire = setup.sae.encode(x.to(setup.sae.W_enc.device))[:, fl]
    mask = edit_positions(fire, x.shape[0], positions)
    if edit is None:
        return x, mask
    return x + edit_delta(setup, x, latent, edit, mask).to(x.dtype), mask


@torch.no_grad()
def greedy(setup: Setup, tokens: list[int], latent: int, edit: Edit | None, positions: str,
           fire_latent: int | None, n: int) -> list[int]:
    """`n` greedy next tokens with the edit applied at every step (positions recomputed on the longer text)."""
    ids = list(tokens)
    eos = getattr(setup.lm.tokenizer, "eos_token_id", None)
    out: list[int] = []
    for _ in range(n):
        t = torch.tensor([ids])
        x = setup.lm.resid(t, setup.hook)[0]
        xe, _ = edited_resid(setup, x, latent, edit, positions, fire_latent)
        nxt = int(logits_from(setup.lm, t, setup.hook, xe[None])[0, -1].argmax())
        out.append(nxt)
        ids.append(nxt)
        if eos is not None and nxt == eos:
            break
    return out


@torch.no_grad()
def intervene(setup: Setup, tokens: Sequence[int], latent: int, edits: Sequence[Edit], positions: str = "all",
              fire_latent: int | None = None, targets: Sequence[str] = (), top_k: int = 10,
              max_new_tokens: int = 0) -> dict[str, Any]:
    """Clean vs edited next-token distributions after `tokens`, for each edit of latent `latent`.

    Returns {"tokens", "clean": {"top", "continuation"}, "edits": [{"name", "kind", "positions", "n_positions",
    "edit_norm", "top", "kl", "targets", "continuation", "decomposition"}], "targets"}: KL is KL(clean || edited)
    in nats at the last position; each target is the log-probability (nats) of its first token, clean and edited.
    """
    if len(tokens) < 2:
        raise InterventionError("prompt", f"gives {len(tokens)} token(s); an edit needs at least 2 (position 0 "
                                          "is never edited)")
    _check(setup, latent, edits, positions, fire_latent)
    lm = setup.lm
    tgt = target_ids(lm, targets)
    t = torch.tensor([list(tokens)])
    x = lm.resid(t, setup.hook)[0]
    clean_logp = torch.log_softmax(logits_from(lm, t, setup.hook, x[None])[0, -1], -1)
    out_edits = []
    for e in edits:
        xe, mask = edited_resid(setup, x, latent, e, positions, fire_latent)
        logp = torch.log_softmax(logits_from(lm, t, setup.hook, xe[None])[0, -1], -1)
        kl = float((clean_logp.exp() * (clean_logp - logp)).sum().clamp_min(0))
        entry: dict[str, Any] = {
            "name": e.title(latent), "kind": e.kind, "positions": torch.nonzero(mask).flatten().tolist(),
            "n_positions": int(mask.sum()), "edit_norm": float((xe - x).float().norm(dim=-1).max()),
            "top": _top(logp, lm, top_k), "kl": kl,
            "targets": [{"text": s, "id": i, "n_tokens": n, "token": lm.decode_tokens([i])[0],
                         "logp_clean": float(clean_logp[i]), "logp_edited": float(logp[i]),
                         "delta": float(logp[i] - clean_logp[i])} for (s, i, n) in tgt],
            "continuation": None, "decomposition": None,
        }
        if e.kind == "meta" and setup.meta is not None:
            w = meta_weights(setup.meta, setup.sae.W_dec[latent])
            entry["decomposition"] = [
                {"meta_latent": int(m), "weight": float(w[m]), "scale": float(e.meta_scales.get(int(m), 1.0)),
                 "label": str(setup.meta_labels[m]) if m < len(setup.meta_labels) else ""}
                for m in torch.nonzero(w > 0).flatten().tolist()]
        if max_new_tokens:
            entry["continuation"] = lm.decode(
                greedy(setup, list(tokens), latent, e, positions, fire_latent, max_new_tokens))
        out_edits.append(entry)
    clean: dict[str, Any] = {"top": _top(clean_logp, lm, top_k), "continuation": None}
    if max_new_tokens:
        clean["continuation"] = lm.decode(
            greedy(setup, list(tokens), latent, None, positions, fire_latent, max_new_tokens))
    return {"tokens": lm.decode_tokens(tokens), "token_ids": [int(i) for i in tokens], "latent": int(latent),
            "width": setup.sae.width, "clean": clean, "edits": out_edits,
            "targets": [{"text": s, "id": i, "n_tokens": n, "logp_clean": float(clean_logp[i])} for s, i, n in tgt]}


# ------------------------------------------------------------------------------------------------ the lab page


TARGET_SEP = "|"  # targets in the URL: " Germany| physics" (a comma or space could be part of a token)


def parse_scales(text: str | None, allowed: Sequence[int]) -> dict[int, float]:
    """'3:0,11:0.5' -> {3: 0.0, 11: 0.5}; meta-latents outside `allowed` and bad pieces raise ValueError."""
    out: dict[int, float] = {}
    for piece in (text or "").split(","):
        if not piece.strip():
            continue
        m, _, s = piece.partition(":")
        try:
            mi, sf = int(m), float(s)
        except ValueError:
            raise ValueError(f"Meta-latent scale {piece.strip()[:40]!r} in the URL is not 'meta:scale'.") from None
        if mi not in allowed:
            raise ValueError(f"Meta-latent {mi} in the URL is not in this latent's decomposition ({list(allowed)}).")
        if not (math.isfinite(sf) and -10 <= sf <= 10):
            raise ValueError(f"The scale of meta-latent {mi} in the URL must be between -10 and 10.")
        out[mi] = sf
    return out


def parse_targets(text: str | None) -> list[str]:
    """' Germany| physics' -> [' Germany', ' physics'] (empty pieces dropped, at most 8)."""
    return [t for t in (text or "").split(TARGET_SEP) if t][:8]


def lab_body(width: int, latent: int, prompt: str, targets: Sequence[str], remove: int | None,
             scales: dict[int, float], positions: str = "all", max_new_tokens: int = 0) -> dict[str, Any]:
    """The /v1/intervene body the lab page sends: whole-latent ablation, removing one meta-latent, and (when a
    slider moved) the sliders' meta-latent scales."""
    edits: list[dict[str, Any]] = [{"kind": "ablate", "name": f"ablate latent {latent}"}]
    if remove is not None:
        edits.append({"kind": "meta", "meta_scales": [{"meta_latent": int(remove), "scale": 0.0}],
                      "name": f"remove meta-latent {remove}"})
    moved = {m: s for m, s in scales.items() if s != 1.0}
    if moved:
        edits.append({"kind": "meta", "name": "sliders",
                      "meta_scales": [{"meta_latent": int(m), "scale": float(s)} for m, s in sorted(moved.items())]})
    return {"prompt": prompt, "width": int(width), "latent": int(latent), "edits": edits, "targets": list(targets),
            "positions": positions, "top_k": 10, "max_new_tokens": int(max_new_tokens)}


def via_backend(backend: Any, body: dict[str, Any]) -> dict[str, Any]:
    """POST /v1/intervene through a metasae backend client (or a test fake), as plain nested dicts."""
    result = backend.intervene(**body)
    return result.model_dump() if hasattr(result, "model_dump") else dict(result)


def summary_table(result: dict[str, Any]) -> Any:
    """One row per edit: KL, tokens edited, the top next token, and each target's log-prob change (nats)."""
    import pandas as pd

    rows = [{"edit": "clean", "KL (nats)": 0.0, "tokens edited": 0,
             "top token": result["clean"]["top"][0]["token"] if result["clean"]["top"] else "",
             **{f"Δ log p({t['text']!r})": 0.0 for t in result.get("targets", [])}}]
    for e in result["edits"]:
        rows.append({"edit": e["name"], "KL (nats)": e["kl"], "tokens edited": e["n_positions"],
                     "top token": e["top"][0]["token"] if e["top"] else "",
                     **{f"Δ log p({t['text']!r})": t["delta"] for t in e["targets"]}})
    return pd.DataFrame(rows)


def targets_figure(result: dict[str, Any]) -> Any:
    """Grouped bars: the log-prob change of each target token under each edit."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for e in result["edits"]:
        fig.add_bar(name=e["name"], x=[repr(t["text"]) for t in e["targets"]], y=[t["delta"] for t in e["targets"]],
                    hovertemplate="%{x}: %{y:.3f} nats<extra>" + e["name"] + "</extra>")
    fig.update_layout(title="Change in log-probability of the watched tokens", barmode="group", height=340,
                      yaxis_title="Δ log p (nats)", margin={"l": 50, "r": 10, "t": 50, "b": 40},
                      legend={"orientation": "h", "y": -0.2})
    return fig


def default_prompt(examples: Sequence[dict[str, Any]], max_tokens: int = 32) -> str:
    """The latent's top example up to and including its max-activation token (so the latent fires at the end)."""
    for ex in examples:
        toks, pos = ex.get("tokens") or [], ex.get("position")
        if toks and pos is not None and 0 <= int(pos) < len(toks):
            return "".join(str(t) for t in toks[max(0, int(pos) + 1 - max_tokens): int(pos) + 1])
    return ""
