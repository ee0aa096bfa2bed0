"""One-pass latent statistics against the per-latent loop, and attention sinks left out as in training."""

from __future__ import annotations

import numpy as np
import torch

from metasae.sae import Sae
from metasae.stats import latent_stats, per_latent_stats_loop, top_tokens


def _relu_sae(d: int = 16, w: int = 24, seed: int = 0) -> Sae:
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(w, d, generator=g)
    return Sae(W_enc=W_dec.T.clone(), b_enc=-0.5 * torch.ones(w), W_dec=W_dec, b_dec=torch.zeros(d),
               threshold=None, apply_b_dec_to_input=False)


def _acts(n_ctx: int = 40, T: int = 9, d: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n_ctx, T, d, generator=torch.Generator().manual_seed(seed))


def test_one_pass_matches_the_per_latent_loop() -> None:
    sae, acts = _relu_sae(), _acts()
    s = latent_stats(sae, iter([(0, acts[:23]), (23, acts[23:])]), k=5, progress=False)
    ref = per_latent_stats_loop(sae, acts, list(range(sae.width)), k=5)
    for j, r in enumerate(ref):
        assert abs(s.density[j] - r["density"]) < 1e-6
        assert abs(s.max_act[j] - r["max_act"]) < 1e-4
        got = s.top_ctx[j][s.top_ctx[j] >= 0].tolist()
        assert got == r["top_ctx"]


def test_sinks_are_left_out_like_in_training() -> None:
    sae, acts = _relu_sae(), _acts()
    acts[7, 3] *= 100  # one attention sink: every latent it fires would take it as its top example
    with_sink = latent_stats(sae, iter([(0, acts)]), k=3, progress=False)
    without = latent_stats(sae, iter([(0, acts)]), k=3, progress=False, max_norm_ratio=5.0)
    fired_by_sink = np.flatnonzero((sae.encode(acts[7, 3][None]) > 0)[0].numpy())
    assert len(fired_by_sink) > 3
    assert all(with_sink.top_ctx[j, 0] == 7 and with_sink.top_pos[j, 0] == 3 for j in fired_by_sink)
    assert not any(without.top_ctx[j, 0] == 7 and without.top_pos[j, 0] == 3 for j in fired_by_sink)
    # density over the kept tokens: the loop on the same tokens with the sink's row zeroed to "never fires"
    assert without.n_tokens == acts.shape[0] * (acts.shape[1] - 1) - 1
    clean = acts.clone()
    clean[7, 3] = 0  # pre-activation = b_enc < 0: fires nowhere
    ref = per_latent_stats_loop(sae, clean, list(range(sae.width)), k=3)
    n_all = acts.shape[0] * (acts.shape[1] - 1)
    for j, r in enumerate(ref):
        assert abs(without.density[j] - r["density"] * n_all / without.n_tokens) < 1e-6
    # and the label's top tokens come from the kept tokens
    tokens = torch.arange(acts.shape[0] * acts.shape[1]).view(acts.shape[0], acts.shape[1])
    sink_token = int(tokens[7, 3])
    assert all(sink_token not in row for row in top_tokens(without, tokens))
    assert any(sink_token in row for row in top_tokens(with_sink, tokens))
