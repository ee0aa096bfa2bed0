"""SAEDashboard side by side: our one-pass dashboard statistics vs SAEDashboard's feature-data generation.

    bash scripts/saedashboard_env.sh            # once: SAEDashboard 0.8.0 in its own venv, .venv-saedashboard
    python -m benchmarks.saedashboard --json [--quick]

Same model, same tokens, same SAE, same latents (all of them), same machine, one run:

- model: a random-weight GPT-2-architecture model (`metasae.lm.tiny_model("gpt2")`, seed 0, 2 layers,
  d_model 128, 4 heads, vocab 4096). We run it through Hugging Face transformers; SAEDashboard gets the same
  weights converted to a `HookedTransformer` (transformer-lens's own GPT-2 converter, no LayerNorm folding), and
  the residual streams at the hook are checked equal before anything is timed.
- tokens: uniform random ids (seed 1) in contexts of 128 with the same BOS-like token 0 at position 0.
- SAE: a ReLU SAE planted on the model's activations at `blocks.1.hook_resid_pre`: each decoder row is a
  centred activation of a random token, the encoder is its transpose, and each bias is set so the latent fires
  on a log-uniform 0.1%-10% of tokens, and never at position 0 (which our statistics skip).

Ours (timed): the model forward to the hook, `latent_stats` (density, mean/max, histogram, top-k contexts),
`example_rows` (per-token activations around every top example) and `boosted_tokens` (logit table).
SAEDashboard (timed, in a subprocess with its own venv's python): `SaeVisRunner.run` with a layout of the same
parts (activation histogram, logits table and histogram, top-k activating examples over whole contexts, no
quantile groups, no feature tables). Data goes through safetensors and JSON only.

Agreement: SAEDashboard picks its top-k *tokens*, several of which can come from one context; ours keeps the
top-k *contexts* (each by its max token). The distinct contexts in SAEDashboard's top-k tokens, in order, are
exactly the top contexts by max activation, so they must equal a prefix of ours, with the same positions and
values. Densities are compared as counts of active tokens. The last line is one JSON object with
`saedashboard_ratio` (SAEDashboard's seconds / ours).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ENV_PYTHON = ROOT / ".venv-saedashboard" / "bin" / "python"
HOOK = "blocks.1.hook_resid_pre"
MODEL = dict(n_layers=2, d_model=128, vocab=4096, n_head=4, n_positions=512)
JSON_KEYS = {"saedashboard_ratio", "seconds_ours", "seconds_saedashboard", "cpu_seconds_ours", "cpu_seconds_saedashboard",
             "wall_ratio", "sae_width", "n_tokens", "k",
             "topk_agree", "top1_agree", "topk_value_max_abs_err", "density_agree", "density_max_abs_err",
             "logits_top_agree", "resid_max_abs_err", "peak_mb", "setup", "goal"}


# --- comparison logic (pure numpy, unit-tested) --------------------------------------------------------------

def dedup_contexts(ctx: np.ndarray, pos: np.ndarray, val: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k tokens (sorted by value, descending) -> the distinct contexts in order of first appearance.

    The first token of a context in a descending top-k list is that context's max, so the result is the list of
    top contexts by max activation (as many as the top-k tokens reach). Tokens with value <= 0 are dropped.
    """
    keep = val > 0
    ctx, pos, val = ctx[keep], pos[keep], val[keep]
    order = np.argsort(-val, kind="stable")
    ctx, pos, val = ctx[order], pos[order], val[order]
    _, first = np.unique(ctx, return_index=True)
    first = np.sort(first)
    return ctx[first], pos[first], val[first]


def compare_topk(ours_ctx: np.ndarray, ours_pos: np.ndarray, ours_val: np.ndarray, their_ctx: np.ndarray,
                 their_pos: np.ndarray, their_val: np.ndarray, tol: float = 2e-4) -> dict:
    """Per-latent agreement of our top contexts (w, k) with SAEDashboard's top tokens (w, K).

    A latent agrees when SAEDashboard's distinct contexts equal our first ones (context, position, value within
    `tol`), allowing swaps between entries whose values are within `tol` of each other (float near-ties).
    """
    w = ours_ctx.shape[0]
    agree = np.zeros(w, dtype=bool)
    top1 = np.zeros(w, dtype=bool)
    err = 0.0
    for j in range(w):
        c, p, v = dedup_contexts(their_ctx[j], their_pos[j], their_val[j])
        live = ours_val[j] > 0
        oc, op, ov = ours_ctx[j][live], ours_pos[j][live], ours_val[j][live]
        m = min(len(c), len(oc))
        if len(c) == 0 or len(oc) == 0:
            agree[j] = top1[j] = len(c) == len(oc) == 0
            continue
        if len(c) > len(oc) and len(oc) < ours_ctx.shape[1]:
            continue  # SAEDashboard found contexts ours says are silent
        err = max(err, float(np.abs(v[:m] - ov[:m]).max()))
        top1[j] = c[0] == oc[0] and p[0] == op[0]
        if np.array_equal(c[:m], oc[:m]) and np.array_equal(p[:m], op[:m]):
            agree[j] = bool(np.abs(v[:m] - ov[:m]).max() <= tol)
            continue
        # near-ties: the same (context, position) pairs once entries within tol of each other may swap
        if np.abs(v[:m] - ov[:m]).max() <= tol:
            mine = {(int(a), int(b)) for a, b, x in zip(oc[:m], op[:m], ov[:m], strict=True) if x > ov[m - 1] + tol}
            theirs = {(int(a), int(b)) for a, b, x in zip(c[:m], p[:m], v[:m], strict=True) if x > ov[m - 1] + tol}
            agree[j] = mine == theirs
        top1[j] = top1[j] or (abs(v[0] - ov[0]) <= tol and (m == 1 or ov[0] - ov[1] <= tol))
    return {"topk_agree": float(agree.mean()), "top1_agree": float(top1.mean()), "topk_value_max_abs_err": err,
            "disagreeing": np.flatnonzero(~agree)[:10].tolist()}


def compare_density(ours_count: np.ndarray, their_count: np.ndarray, n_tokens: int) -> dict:
    """Active-token counts per latent: fraction equal, and the largest density difference."""
    ours_count, their_count = np.asarray(ours_count, np.int64), np.asarray(their_count, np.int64)
    return {"density_agree": float((ours_count == their_count).mean()),
            "density_max_abs_err": float(np.abs(ours_count - their_count).max() / n_tokens)}


def compare_logits(ours_ids: np.ndarray, their_ids: np.ndarray) -> float:
    """Fraction of latents whose top boosted token ids are the same set."""
    return float(np.mean([set(a.tolist()) == set(b.tolist()) for a, b in zip(ours_ids, their_ids, strict=True)]))


# --- parent: setup, our pipeline, the child run ---------------------------------------------------------------

def plant_sae(lm, tokens, width: int, seed: int = 2):
    """ReLU SAE planted on the model's activations at HOOK (see the module docstring)."""
    import torch

    from metasae.sae import Sae

    g = torch.Generator().manual_seed(seed)
    x = lm.resid(tokens[:32], HOOK).float()  # (32, T, d)
    v0 = x[0, 0]  # position 0 holds the same token in every context: the same residual
    flat = x[:, 1:].reshape(-1, x.shape[-1])
    mean = flat.mean(0)
    D = flat[torch.randint(0, len(flat), (width,), generator=g)] - mean
    D = D / D.norm(dim=1, keepdim=True)
    proj = flat @ D.T  # (n, w)
    dens = torch.exp(torch.empty(width).uniform_(np.log(1e-3), np.log(1e-1), generator=g))
    b_enc = -torch.stack([proj[:, j].quantile(1 - float(dens[j])) for j in range(width)])
    b_enc = torch.minimum(b_enc, -(v0 @ D.T) - 1e-2)  # silent at position 0
    return Sae(W_enc=D.T.contiguous(), b_enc=b_enc, W_dec=D.clone(), b_dec=mean, hook_name=HOOK,
               model_name="tiny-gpt2-random")


def our_dashboard(lm, sae, tokens, k: int):
    """What our build computes for a dashboard, from tokens: forward, one-pass stats, example rows, logit table."""
    import torch

    from metasae.stats import boosted_tokens, example_rows, latent_stats

    acts = torch.cat([lm.resid(tokens[b:b + 32], HOOK) for b in range(0, len(tokens), 32)])
    chunks = iter([(b, acts[b:b + 64]) for b in range(0, len(acts), 64)])
    s = latent_stats(sae, chunks, k=k, progress=False)
    rows = example_rows(sae, s, lambda c: acts[torch.as_tensor(c)], tokens, lm.decode_tokens, n_examples=k)
    boosted = boosted_tokens(sae.W_dec, lm.unembed(), lm.decode_tokens, k=10)
    return s, rows, boosted


def run(quick: bool, layout: str = "matched", threads: int = 1, width: int | None = None,
        contexts: int | None = None) -> dict:
    import resource

    import torch
    from safetensors.torch import load_file, save_file

    from benchmarks.common import measure
    from metasae.lm import tiny_model

    if not ENV_PYTHON.is_file():
        raise SystemExit(f"{ENV_PYTHON} is missing: run `bash scripts/saedashboard_env.sh` first")
    torch.set_num_threads(threads)
    w0, c0, T, k = (512, 32, 128, 20) if quick else (4096, 256, 128, 20)
    width, n_ctx = width or w0, contexts or c0
    lm = tiny_model("gpt2", seed=0, n_layers=MODEL["n_layers"], d_model=MODEL["d_model"], vocab=MODEL["vocab"])
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, MODEL["vocab"], (n_ctx, T), generator=g)
    tokens[:, 0] = 0
    sae = plant_sae(lm, tokens, width)

    with tempfile.TemporaryDirectory(prefix="saedash-") as tmp:
        tmp = Path(tmp)
        sd, seen = {}, set()
        for name, t in lm.model.state_dict().items():
            if t.data_ptr() in seen:  # tied lm_head
                continue
            seen.add(t.data_ptr())
            sd[name] = t.contiguous()
        save_file(sd, tmp / "model.safetensors")
        c = lm.model.config
        (tmp / "model.json").write_text(json.dumps(dict(
            n_layer=c.n_layer, n_embd=c.n_embd, n_head=c.n_head, vocab_size=c.vocab_size, n_positions=c.n_positions,
            layer_norm_epsilon=c.layer_norm_epsilon, activation_function=c.activation_function)))
        save_file({"tokens": tokens.contiguous()}, tmp / "tokens.safetensors")
        sae.save(tmp / "sae")
        (tmp / "args.json").write_text(json.dumps({"hook": HOOK, "k": k, "layout": layout, "threads": threads}))

        # ours, in this process (warm-up on two contexts first so neither side pays for first-call overheads)
        our_dashboard(lm, sae, tokens[:2], k)
        with measure() as m:
            t0, c0 = time.perf_counter(), time.process_time()
            s, rows, _boosted = our_dashboard(lm, sae, tokens, k)
            t_ours, cpu_ours = time.perf_counter() - t0, time.process_time() - c0

        # SAEDashboard, in its own venv
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONNOUSERSITE="1")
        env.pop("PYTHONPATH", None)
        t0 = time.perf_counter()
        proc = subprocess.run([str(ENV_PYTHON), str(Path(__file__).resolve()), "--child", str(tmp)], env=env,
                              capture_output=True, text=True)
        t_child_wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"SAEDashboard run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        child_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        theirs = json.loads((tmp / "out.json").read_text())
        out = load_file(tmp / "out.safetensors")

    # the same model: residual streams at the hook of the first contexts
    resid_err = float((lm.resid(tokens[: out["resid"].shape[0]], HOOK) - out["resid"]).abs().max())
    n_tok = s.n_tokens
    top = compare_topk(s.top_ctx, s.top_pos, s.top_val, out["top_ctx"].numpy(), out["top_pos"].numpy(),
                       out["top_val"].numpy())
    ours_count = np.rint(s.density.astype(np.float64) * n_tok).astype(np.int64)
    dens = compare_density(ours_count, out["count"].numpy(), n_tok)
    ours_ids = (sae.W_dec @ lm.unembed()).topk(10, dim=1).indices.numpy()
    logits_agree = compare_logits(ours_ids, out["logit_top_ids"].numpy())
    t_theirs, cpu_theirs = theirs["seconds_run"], theirs["cpu_seconds_run"]
    # CPU seconds of each process (one torch thread each) are the ratio: wall time on this shared 2-core machine
    # depends on what else runs; both are reported
    return {"saedashboard_ratio": cpu_theirs / cpu_ours, "seconds_ours": t_ours, "seconds_saedashboard": t_theirs,
            "cpu_seconds_ours": cpu_ours, "cpu_seconds_saedashboard": cpu_theirs,
            "wall_ratio": t_theirs / t_ours,
            "sae_width": sae.width, "n_tokens": int(tokens.numel()), "k": k, **top, **dens,
            "logits_top_agree": logits_agree, "resid_max_abs_err": resid_err,
            "peak_mb": {"ours_growth": m.peak_mb, "saedashboard_growth": theirs["peak_growth_mb"],
                        "saedashboard_process": child_rss_mb, "saedashboard_before_run": theirs["rss_before_mb"]},
            "setup": {"model": f"random GPT-2 arch {MODEL}", "hook": HOOK, "contexts": n_ctx, "ctx_len": T,
                      "layout": layout, "threads": threads, "saedashboard_child_wall_s": t_child_wall,
                      "saedashboard_versions": theirs["versions"], "example_rows": len(rows)},
            "goal": ">= 10"}


# --- child: runs in SAEDashboard's venv; imports nothing from metasae ------------------------------------------

def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(folder: str) -> None:
    import threading
    from importlib.metadata import version

    import torch
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    args = json.loads((folder / "args.json").read_text())
    torch.set_num_threads(args["threads"])
    from sae_dashboard.components_config import (
        ActsHistogramConfig,
        Column,
        FeatureTablesConfig,
        LogitsHistogramConfig,
        LogitsTableConfig,
        SequencesConfig,
    )
    from sae_dashboard.layout import SaeVisLayoutConfig
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner
    from sae_lens import SAE
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    from transformers import GPT2Config, GPT2LMHeadModel

    mc = json.loads((folder / "model.json").read_text())
    hf = GPT2LMHeadModel(GPT2Config(**mc))
    missing, unexpected = hf.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
    assert not unexpected and all("lm_head" in k or "attn.bias" in k or "masked_bias" in k for k in missing), missing
    hf.tie_weights()
    d = mc["n_embd"]
    cfg = HookedTransformerConfig(n_layers=mc["n_layer"], d_model=d, n_ctx=mc["n_positions"], d_head=d // mc["n_head"],
                                  n_heads=mc["n_head"], d_mlp=4 * d, d_vocab=mc["vocab_size"], act_fn="gelu_new",
                                  normalization_type="LN", eps=mc["layer_norm_epsilon"],
                                  positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
                                  tokenizer_name=None, default_prepend_bos=False)
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False,
                                      refactor_factored_attn_matrices=False)
    model.eval()
    del hf
    tokens = load_file(folder / "tokens.safetensors")["tokens"]
    sae = SAE.load_from_disk(str(folder / "sae"), device="cpu")
    k = args["k"]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[:4], names_filter=args["hook"])
    resid = cache[args["hook"]].contiguous()

    if args["layout"] == "matched":
        layout = SaeVisLayoutConfig(columns=[
            Column(FeatureTablesConfig(), ActsHistogramConfig(), LogitsTableConfig(), LogitsHistogramConfig()),
            Column(SequencesConfig(stack_mode="stack-none", buffer=None, compute_buffer=True, n_quantiles=0,
                                   top_acts_group_size=k))])
    else:  # SAEDashboard's default feature-centric layout (feature tables, 10 quantile groups, buffer (5, 5))
        layout = SaeVisLayoutConfig.default_feature_centric_layout()
    vis_cfg = SaeVisConfig(hook_point=args["hook"], features=list(range(sae.cfg.d_sae)), feature_centric_layout=layout,
                           device="cpu", dtype="float32", verbose=False,
                           ignore_positions=[0])  # position 0 is never analysed by ours either

    base = _rss_mb()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            done.wait(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0, c0 = time.perf_counter(), time.process_time()
    data = SaeVisRunner(vis_cfg).run(encoder=sae, model=model, tokens=tokens)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    done.set()
    th.join()

    w = sae.cfg.d_sae
    top_ctx = np.full((w, k), -1, np.int64)
    top_pos = np.zeros((w, k), np.int64)
    top_val = np.zeros((w, k), np.float32)
    count = np.zeros(w, np.int64)
    logit_ids = np.zeros((w, 10), np.int64)
    T = tokens.shape[1]
    for j, fd in data.feature_data_dict.items():
        group = fd.sequence_data.seq_group_data[0]
        for r, sq in enumerate(group.seq_data[:k]):
            q = sq.qualifying_token_index
            # with buffer=None the stored window is positions 1..T-1 of the context
            off = q - (T - len(sq.feat_acts))
            if off < 0:  # position 0 (never shown): only picked when the latent has fewer than k active tokens
                top_ctx[j, r], top_pos[j, r] = sq.original_index, q
                continue
            assert sq.token_ids[off] == int(tokens[sq.original_index, q])
            top_ctx[j, r], top_pos[j, r], top_val[j, r] = sq.original_index, q, sq.feat_acts[off]
        count[j] = int(round(sum(fd.acts_histogram_data.bar_heights)))
        logit_ids[j] = fd.logits_table_data.top_token_ids[:10]
    save_file({"top_ctx": torch.from_numpy(top_ctx), "top_pos": torch.from_numpy(top_pos),
               "top_val": torch.from_numpy(top_val), "count": torch.from_numpy(count),
               "logit_top_ids": torch.from_numpy(logit_ids), "resid": resid}, folder / "out.safetensors")
    (folder / "out.json").write_text(json.dumps({
        "seconds_run": seconds, "cpu_seconds_run": cpu, "peak_growth_mb": peak[0] - base, "rss_before_mb": base,
        "versions": {p: version(p) for p in ("sae-dashboard", "sae-lens", "transformer-lens", "transformers", "torch")}}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="width 512 on 32 contexts (default: 4096 on 256)")
    p.add_argument("--width", type=int, help="SAE width (overrides --quick's)")
    p.add_argument("--contexts", type=int, help="number of 128-token contexts (overrides --quick's)")
    p.add_argument("--layout", choices=["matched", "default"], default="matched",
                   help="SAEDashboard layout: the parts ours computes (default) or its full default layout")
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a.child)
        return 0
    r = run(a.quick, a.layout, a.threads, a.width, a.contexts)
    print(f"saedashboard_ratio: {r['saedashboard_ratio']:.1f}x (goal >= 10): ours {r['cpu_seconds_ours']:.1f} CPU s, "
          f"SAEDashboard {r['cpu_seconds_saedashboard']:.1f} CPU s (wall {r['wall_ratio']:.1f}x) on width {r['sae_width']}, {r['n_tokens']} tokens; "
          f"top-{r['k']} agree {r['topk_agree']:.3f}, densities agree {r['density_agree']:.3f}")
    if a.json:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
