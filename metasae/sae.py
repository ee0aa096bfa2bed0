"""The SAE weights container used everywhere in metasae, and its round trip to sae-lens.

Stitching needs every latent's activation to depend only on its own pre-activation (ReLU or JumpReLU),
so this container holds exactly that family; TopK SAEs load for encoding but are refused by stitching.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

SAE_CFG = "cfg.json"
SAE_WEIGHTS = "sae_weights.safetensors"


class SaeError(ValueError):
    """A SAE that cannot be used: wrong shapes, non-finite weights, missing files, mismatched pairs."""


@dataclass
class Sae:
    """Encoder/decoder weights of one SAE.

    encode(x) = act((x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc), act = ReLU, or JumpReLU when
    `threshold` is set, or TopK when `k` is set; decode(a) = a @ W_dec + b_dec.
    """

    W_enc: torch.Tensor  # (d_in, width)
    b_enc: torch.Tensor  # (width,)
    W_dec: torch.Tensor  # (width, d_in)
    b_dec: torch.Tensor  # (d_in,)
    threshold: torch.Tensor | None = None  # (width,) JumpReLU thresholds
    k: int | None = None  # TopK SAEs only
    apply_b_dec_to_input: bool = False
    hook_name: str = ""
    model_name: str = ""
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def width(self) -> int:
        return int(self.W_dec.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.W_dec.shape[1])

    @property
    def architecture(self) -> str:
        if self.k is not None:
            return "topk"
        return "jumprelu" if self.threshold is not None else "standard"

    @property
    def per_latent(self) -> bool:
        """True when each latent's activation depends on its own pre-activation only (stitching needs it)."""
        return self.k is None

    def validate(self) -> None:
        """Raise SaeError naming the tensor that has the wrong shape or non-finite values."""
        w, d = self.W_dec.shape if self.W_dec.ndim == 2 else (None, None)
        if w is None:
            raise SaeError(f"W_dec must be 2-D (width, d_in), got shape {tuple(self.W_dec.shape)}")
        expect = {"W_enc": (d, w), "b_enc": (w,), "b_dec": (d,)}
        if self.threshold is not None:
            expect["threshold"] = (w,)
        for name, shape in expect.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise SaeError(f"{name} has shape {got}, expected {shape} for width {w}, d_in {d}")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            t = getattr(self, name)
            if t is not None and not torch.isfinite(t).all():
                bad = int((~torch.isfinite(t)).sum())
                raise SaeError(f"{name} holds {bad} non-finite (NaN/inf) values{self._where()}")

    def _where(self) -> str:
        src = self.metadata.get("source")
        return f" (SAE loaded from {src})" if src else ""

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Sae:
        """A copy on another device/dtype (thresholds follow the weights)."""
        def mv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype)

        return replace(self, W_enc=mv(self.W_enc), b_enc=mv(self.b_enc), W_dec=mv(self.W_dec),
                       b_dec=mv(self.b_dec), threshold=None if self.threshold is None else mv(self.threshold))

    def folded(self) -> Sae:
        """The same function with ``apply_b_dec_to_input=False``: b_dec's encoder term folded into b_enc.

        (x - b_dec) @ W_enc + b_enc == x @ W_enc + (b_enc - b_dec @ W_enc), so encodings are unchanged; stitching
        needs this form because it mixes latents of SAEs whose b_dec differ.
        """
        if not self.apply_b_dec_to_input:
            return self
        b_enc = (self.b_enc.double() - self.b_dec.double() @ self.W_enc.double()).to(self.b_enc.dtype)
        return replace(self, b_enc=b_enc, apply_b_dec_to_input=False)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Apply this SAE's activation function to pre-activations."""
        acts = torch.relu(pre)
        if self.threshold is not None:
            acts = acts * (pre > self.threshold)
        if self.k is not None:
            top = acts.topk(self.k, dim=-1)
            acts = torch.zeros_like(acts).scatter_(-1, top.indices, top.values)
        return acts

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_acts(x))

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return acts.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def unit_decoder(self) -> torch.Tensor:
        """Decoder rows scaled to unit norm (for cosine similarities)."""
        return self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    # --- sae-lens interop -------------------------------------------------------------------------------

    @classmethod
    def from_sae_lens(cls, sae, source: str = "") -> Sae:
        """Wrap any sae-lens Standard / JumpReLU / TopK inference SAE (weights are copied to fp32)."""
        cfg = sae.cfg
        arch = cfg.architecture()
        if getattr(cfg, "normalize_activations", "none") not in ("none", None):
            raise SaeError(
                f"SAE {source or ''} uses normalize_activations={cfg.normalize_activations!r}; fold it into the "
                "weights first (sae-lens: fold_activation_norm_scaling_factor)")
        if getattr(cfg, "reshape_activations", "none") not in ("none", None):
            raise SaeError(f"SAE {source} reshapes activations (hook_z); only residual-stream SAEs are supported")
        sd = {k: v.detach().to("cpu", torch.float32).clone() for k, v in sae.state_dict().items()}
        if arch not in ("standard", "jumprelu", "topk"):
            raise SaeError(f"unsupported sae-lens architecture {arch!r} (supported: standard, jumprelu, topk)")
        if getattr(cfg, "rescale_acts_by_decoder_norm", False):
            # sae-lens TopK option: pre-acts scaled by ||d_j||, acts divided by it before decoding.
            # Folding the norms into the weights gives the same encode/decode under our plain formula.
            norm = sd["W_dec"].norm(dim=-1)
            sd["W_enc"], sd["b_enc"] = sd["W_enc"] * norm, sd["b_enc"] * norm
            sd["W_dec"] = sd["W_dec"] / norm[:, None]
        meta = cfg.metadata.to_dict() if hasattr(cfg.metadata, "to_dict") else dict(cfg.metadata)
        return cls(
            W_enc=sd["W_enc"], b_enc=sd["b_enc"], W_dec=sd["W_dec"], b_dec=sd["b_dec"],
            threshold=sd.get("threshold") if arch == "jumprelu" else None,
            k=int(cfg.k) if arch == "topk" else None,
            apply_b_dec_to_input=bool(cfg.apply_b_dec_to_input),
            hook_name=meta.get("hook_name") or "", model_name=meta.get("model_name") or "",
            metadata={k: v for k, v in meta.items() if v is not None} | ({"source": source} if source else {}),
        )

    def to_sae_lens(self, dtype: str = "float32"):
        """Build the equivalent sae-lens inference SAE."""
        from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig
        from sae_lens.saes.sae import SAEMetadata
        from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

        meta = SAEMetadata(**{k: v for k, v in self.metadata.items() if k != "source"})
        meta.hook_name = self.hook_name or None
        meta.model_name = self.model_name or None
        common = dict(d_in=self.d_in, d_sae=self.width, dtype=dtype,
                      apply_b_dec_to_input=self.apply_b_dec_to_input, metadata=meta)
        sd = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.architecture == "jumprelu":
            assert self.threshold is not None  # what makes it jumprelu
            model, sd["threshold"] = JumpReLUSAE(JumpReLUSAEConfig(**common)), self.threshold
        elif self.architecture == "topk":
            model = TopKSAE(TopKSAEConfig(k=self.k, **common))
        else:
            model = StandardSAE(StandardSAEConfig(**common))
        tdtype = getattr(torch, dtype)
        model.load_state_dict({k: v.detach().to("cpu", tdtype) for k, v in sd.items()})
        return model

    def save(self, path: str | Path, dtype: str = "float32") -> Path:
        """Save in sae-lens format (cfg.json + sae_weights.safetensors); SAE.load_from_disk reads it."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        self.to_sae_lens(dtype).save_model(tmp)
        if path.exists():
            import shutil

            shutil.rmtree(path)
        tmp.rename(path)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> Sae:
        """Load a sae-lens-format folder (ours or any other) as fp32."""
        from sae_lens import SAE

        path = Path(path)
        if not path.is_dir():
            raise SaeError(f"SAE folder {path} does not exist")
        for name in (SAE_CFG, SAE_WEIGHTS):
            if not (path / name).is_file():
                raise SaeError(f"SAE folder {path} lacks {name}")
        try:
            json.loads((path / SAE_CFG).read_text())
            sae = SAE.load_from_disk(path, device="cpu", dtype="float32")
        except SaeError:
            raise
        except Exception as e:  # sae-lens raises many types; name the folder
            raise SaeError(f"cannot load SAE from {path}: {type(e).__name__}: {e}") from e
        return cls.from_sae_lens(sae, source=str(path)).to(device=device)

    @classmethod
    def from_pretrained(cls, release: str, sae_id: str, device: str = "cpu") -> Sae:
        """Load a sae-lens pretrained SAE (uses the Hugging Face cache; honours HF_HUB_OFFLINE)."""
        from sae_lens import SAE

        try:
            sae = SAE.from_pretrained(release, sae_id, device="cpu")
        except Exception as e:
            raise SaeError(f"cannot load sae-lens release {release!r} id {sae_id!r}: {type(e).__name__}: {e}") from e
        if isinstance(sae, tuple):  # older sae-lens returned (sae, cfg, sparsity)
            sae = sae[0]
        return cls.from_sae_lens(sae, source=f"{release}/{sae_id}").to(device=device)


def check_pair(small: Sae, large: Sae) -> None:
    """Raise SaeError unless two SAEs can be stitched (same d_in, same hook, per-latent activations)."""
    if small.d_in != large.d_in:
        raise SaeError(f"SAEs have different d_in: {small.d_in} (width {small.width}) vs {large.d_in} "
                       f"(width {large.width})")
    if small.hook_name and large.hook_name and small.hook_name != large.hook_name:
        raise SaeError(f"SAEs read different hooks: {small.hook_name!r} vs {large.hook_name!r}")
    for s in (small, large):
        if not s.per_latent:
            raise SaeError(f"SAE of width {s.width} is TopK: insertion/removal of single latents is ill-defined; "
                           "use ReLU or JumpReLU SAEs (sae-lens saves a trained BatchTopK SAE as JumpReLU)")
