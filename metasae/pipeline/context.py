"""What the stages share while a build runs: its config and folders, plus the model, activations and SAEs,
each loaded once on first use (a resumed build that skips a stage never pays for what only that stage needed)."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from metasae.pipeline.config import BuildConfig

if TYPE_CHECKING:
    import torch

    from metasae.activations import ActivationStore
    from metasae.lm import LanguageModel
    from metasae.sae import Sae


@dataclass
class BuildContext:
    """One build's state, handed to every stage."""

    cfg: BuildConfig
    work: Path
    out: Path
    force: bool = False
    progress: bool = True
    log: Callable[[str], None] = print
    workers: int = 1
    _lm: LanguageModel | None = field(default=None, repr=False)
    _store: ActivationStore | None = field(default=None, repr=False)
    _saes: list[Sae] | None = field(default=None, repr=False)
    _eval_acts: torch.Tensor | None = field(default=None, repr=False)

    @property
    def lm(self) -> LanguageModel:
        if self._lm is None:
            self._lm = load_model(self.cfg)
        return self._lm

    @property
    def store(self) -> ActivationStore:
        """The activation store the activations stage made (or the complete one in the work folder)."""
        if self._store is None:
            from metasae.activations import ActivationStore

            self._store = ActivationStore.open(self.work / "acts")
        return self._store

    @store.setter
    def store(self, store: ActivationStore) -> None:
        self._store = store

    @property
    def saes(self) -> list[Sae]:
        """The ladder, smallest first."""
        if self._saes is None:
            from metasae.sae import Sae

            self._saes = [Sae.load(self.work / "saes" / str(w)) for w in self.cfg.ladder.widths]
        return self._saes

    @saes.setter
    def saes(self, saes: list[Sae]) -> None:
        self._saes = saes

    @property
    def eval_acts(self) -> torch.Tensor:
        """The held-out evaluation activations (attention sinks left out), shared by evaluation and stitching."""
        if self._eval_acts is None:
            self._eval_acts = self.store.flat(n_eval_ctx(self.cfg), self.cfg.train.max_norm_ratio)
        return self._eval_acts

    def eval_tokens(self) -> torch.Tensor:
        """The contexts CE and ΔCE run on: the first of the held-out ones."""
        return self.store.tokens()[: min(n_eval_ctx(self.cfg), self.cfg.evaluate.ce_ctx)]


def load_model(cfg: BuildConfig) -> LanguageModel:
    """The build's model (module-level and picklable: worker processes load it themselves)."""
    from metasae.model_spec import load_model as load

    return load(cfg.model, seed=cfg.seed)


def n_eval_ctx(cfg: BuildConfig) -> int:
    """Contexts held out of SAE training for evaluation (the first ones of the shuffled corpus)."""
    return max(1, cfg.ladder.eval_tokens // (cfg.corpus.ctx_len - 1))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Stage:
    """Times a stage and prints its one-line summary (time, peak memory)."""

    def __init__(self, name: str, log: Callable[[str], None]):
        self.name, self.log = name, log

    def __enter__(self) -> Stage:
        self.t = time.time()
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.log(f"[{self.name}] done in {time.time() - self.t:.1f}s, peak RSS {peak_rss_mb():.0f} MB")
