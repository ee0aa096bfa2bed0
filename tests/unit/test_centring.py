"""The ladder's fixed centre (and optional dense pathway) folds into an ordinary SAE with the same outputs."""

from __future__ import annotations

import functools
import operator

import pytest
import torch

from metasae.parallel import run_jobs
from metasae.sae import Sae
from metasae.train import DensePath, dense_latents


@pytest.mark.parametrize("r", [0, 3])
def test_composed_sae_equals_centre_plus_pathway_plus_sparse(make_sae, tmp_path, r: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=g, dtype=torch.float64) * torch.linspace(5, 0.5, 12, dtype=torch.float64) + 3
    dense = DensePath.fit(x, r)
    sparse = make_sae(12, 20, seed=1, jumprelu=True).to(dtype=torch.float64)
    dense = DensePath(dense.mean.double(), dense.V.double())
    full = dense.compose(sparse)
    xc = x - dense.mean
    ref = dense.mean + (xc @ dense.V) @ dense.V.T + sparse.reconstruct(dense.residual(x))
    assert torch.allclose(full.reconstruct(x), ref, atol=1e-9)
    assert full.width == 20 + 2 * r and list(dense_latents(full)) == list(range(20, 20 + 2 * r))
    # the sparse latents' activations are exactly the sparse SAE's on the centred residual
    assert torch.allclose(full.encode(x)[:, :20], sparse.encode(dense.residual(x)), atol=1e-9)
    # and it survives the sae-lens round trip
    back = Sae.load(full.save(tmp_path / f"r{r}"))
    assert torch.allclose(back.reconstruct(x.float()), ref.float(), atol=1e-3)
    assert list(dense_latents(back)) == list(dense_latents(full))


def test_fit_finds_the_mean_and_the_leading_direction() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 6, generator=g) * torch.tensor([10.0, 1, 1, 1, 1, 1]) + 2
    d = DensePath.fit(x, 1)
    assert torch.allclose(d.mean, x.double().mean(0).float(), atol=1e-5)
    assert abs(float(d.V[0, 0])) > 0.99


@pytest.mark.slow  # worker processes
def test_run_jobs_in_processes_returns_results_in_order() -> None:
    jobs = [functools.partial(operator.mul, i, 10) for i in range(5)]
    assert run_jobs(jobs, workers=2, costs=[1, 5, 2, 4, 3]) == [0, 10, 20, 30, 40]
    assert run_jobs(jobs, workers=1) == [0, 10, 20, 30, 40]
