"""Shared small fixtures: tiny random-weight models, a SAE factory, the real SmolLM2 (loaded once)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from metasae.lm import LanguageModel, tiny_model
from metasae.sae import Sae

# Tests use small tensors: on a busy 2-core machine a second torch thread costs far more than the math
# (measured: one tiny-Llama forward 0.5 s with 2 threads vs 3 ms with 1; a 64-token SmolLM2 forward 10 s vs 0.4 s).
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"  # and for the subprocesses some tests start
# Tests choose their atlases; the bundled data/ atlas would add itself to the app's atlas list.
os.environ["METASAE_BUNDLED"] = os.path.join(os.path.dirname(__file__), "no-bundled-atlas")


# --- the fast inner loop: `pytest -m "not slow"` (CI runs everything) -------------------------------------------
# A test is slow when it starts processes (backend servers, Ray, Streamlit, the container entrypoint), runs a full
# build, loads the real SmolLM2 or drives a browser. Marked here by folder and by the fixtures that do those things
# (pytest resolves fixtures transitively, so every test behind `tiny_atlas` counts), so a new test that uses one is
# marked without a decorator; the few tests that do such work inline carry @pytest.mark.slow themselves.
SLOW_FOLDERS = {"browser", "container"}
SLOW_FIXTURES = {
    "smollm2",  # the real SmolLM2 (~20 s to load)
    "tiny_atlas",  # a full `metasae build --preset tiny` (tests/backend, tests/unit/test_build.py)
    "servers",  # two `metasae backend` processes
    "real_backend",  # a tiny build and a backend process (tests/app/test_real_backend.py)
    "ray_local",  # a local Ray cluster
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests = Path(__file__).parent
    for item in items:
        folder = Path(item.path).relative_to(tests).parts[0] if Path(item.path).is_relative_to(tests) else ""
        if folder in SLOW_FOLDERS or SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def smollm2() -> LanguageModel:
    """The embedded default model (SmolLM2-135M, ~20 s to load): loaded at most once per test session."""
    return LanguageModel.load()


@pytest.fixture(scope="session")
def tiny_llama() -> LanguageModel:
    """Shared read-only tiny Llama (4 layers, d_model 32, byte vocab). To mutate one, call tiny_model()."""
    return tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_gpt2() -> LanguageModel:
    """Shared read-only tiny GPT-2 (4 layers, d_model 32, byte vocab)."""
    return tiny_model("gpt2")


def random_sae(
    d_in: int,
    width: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    jumprelu: bool = False,
    apply_b_dec_to_input: bool = False,
    hook_name: str = "blocks.1.hook_resid_pre",
) -> Sae:
    """A random SAE whose latents fire on about half of standard-normal inputs (thresholds bite if set)."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(width, d_in, generator=g, dtype=torch.float64)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    W_enc = W_dec.T.contiguous() + 0.1 * torch.randn(d_in, width, generator=g, dtype=torch.float64)
    b_enc = 0.1 * torch.randn(width, generator=g, dtype=torch.float64)
    b_dec = 0.1 * torch.randn(d_in, generator=g, dtype=torch.float64)
    threshold = 0.5 * torch.rand(width, generator=g, dtype=torch.float64) if jumprelu else None
    sae = Sae(
        W_enc,
        b_enc,
        W_dec,
        b_dec,
        threshold=threshold,
        apply_b_dec_to_input=apply_b_dec_to_input,
        hook_name=hook_name,
    )
    return sae.to(dtype=dtype)


@pytest.fixture(scope="session")
def make_sae():
    """Factory fixture for random_sae (so test modules need not import conftest)."""
    return random_sae
