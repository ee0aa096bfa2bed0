"""The AuxK dead-latent window: its default, its build setting, and that it reaches sae-lens's trainer."""

from __future__ import annotations

import pytest
import torch

from metasae.pipeline.config import LadderTrainConfig
from metasae.train import TrainConfig, dead_window_steps, train_sae


def test_default_window_is_a_quarter_of_training_and_a_setting_overrides_it() -> None:
    assert dead_window_steps(TrainConfig(n_tokens=1_024_000, batch_size=512)) == 500  # 2000 steps / 4
    assert dead_window_steps(TrainConfig(n_tokens=20_480, batch_size=512)) == 50  # never below 50 steps
    assert dead_window_steps(TrainConfig(n_tokens=1_024_000, batch_size=512, dead_window_tokens=20_480)) == 40
    with pytest.raises(ValueError, match="dead_window_tokens"):
        TrainConfig(batch_size=512, dead_window_tokens=100)


def test_build_setting_is_checked_and_passed_on() -> None:
    cfg = LadderTrainConfig(batch_size=512, dead_window_tokens=20_480)
    assert cfg.train_config(seed=3).dead_window_tokens == 20_480
    assert LadderTrainConfig().train_config(seed=0).dead_window_tokens is None
    with pytest.raises(ValueError, match="dead_window_tokens"):
        LadderTrainConfig(batch_size=512, dead_window_tokens=64)


def test_trainer_counts_latents_dead_after_the_window(monkeypatch) -> None:
    import sae_lens.training.sae_trainer as trainer_mod

    seen = {}
    real = trainer_mod.SAETrainer

    class Spy(real):  # type: ignore[misc, valid-type]
        def __init__(self, cfg, *a, **k):
            seen["window"] = cfg.dead_feature_window
            super().__init__(cfg, *a, **k)

    monkeypatch.setattr(trainer_mod, "SAETrainer", Spy)
    g = torch.Generator().manual_seed(0)
    batches = iter([torch.randn(64, 8, generator=g) for _ in range(40)])
    cfg = TrainConfig(architecture="batchtopk", n_tokens=64 * 20, batch_size=64, k=2, dead_window_tokens=64 * 3)
    sae = train_sae(batches, 8, 16, cfg, progress=False)
    assert seen["window"] == 3
    assert sae.metadata["training"]["dead_window_tokens"] == 192
