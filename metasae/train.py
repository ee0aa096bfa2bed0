"""SAE ladders: train through sae-lens's SAETrainer on our activation store, import pretrained ones, evaluate.

MSE here is the per-token squared error summed over d_model and averaged over tokens; FVU divides the summed
squared error by the summed squared deviation from the mean activation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from metasae.sae import Sae, SaeError


@dataclass
class TrainConfig:
    """How one SAE of a ladder is trained (defaults follow the paper's ReLU + L1 SAEs, scaled down)."""

    architecture: str = "standard"  # "standard" (ReLU + L1) or "batchtopk"
    n_tokens: int = 1_000_000
    batch_size: int = 4096
    lr: float = 4e-4
    l1_coefficient: float = 5.0
    l1_warm_up_frac: float = 0.05
    k: float = 32.0  # batchtopk only
    aux_loss_coefficient: float = 1 / 32
    lr_warm_up_frac: float = 0.02
    lr_decay_frac: float = 0.2
    # subtract b_dec before encoding in training (folded into b_enc after); off by default: on SmolLM2 layer 15 it
    # left 3x more latents dead after 600k tokens
    center_input: bool = False
    max_norm_ratio: float | None = None  # drop training rows with norm > this x median (attention sinks)
    normalize: bool = True  # scale inputs to mean norm sqrt(d) while training; folded into the weights after
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.architecture not in ("standard", "batchtopk"):
            raise ValueError(f"architecture must be 'standard' or 'batchtopk', got {self.architecture!r}")
        if self.n_tokens < self.batch_size:
            raise ValueError(f"n_tokens ({self.n_tokens}) must be at least one batch ({self.batch_size})")


def _training_sae(d_in: int, width: int, cfg: TrainConfig, hook: str, model: str):
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig

    steps = cfg.n_tokens // cfg.batch_size
    meta = SAEMetadata(hook_name=hook, model_name=model)
    norm = "expected_average_only_in" if cfg.normalize else "none"
    common = dict(d_in=d_in, d_sae=width, device=cfg.device, metadata=meta, normalize_activations=norm)
    if cfg.architecture == "standard":
        return StandardTrainingSAE(StandardTrainingSAEConfig(
            l1_coefficient=cfg.l1_coefficient, l1_warm_up_steps=int(cfg.l1_warm_up_frac * steps),
            apply_b_dec_to_input=cfg.center_input, **common))
    return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(
        k=cfg.k, aux_loss_coefficient=cfg.aux_loss_coefficient, apply_b_dec_to_input=cfg.center_input, **common))


def train_sae(batches: Iterator[torch.Tensor], d_in: int, width: int, cfg: TrainConfig, hook: str = "",
              model: str = "", init_b_dec: torch.Tensor | None = None, progress: bool = True) -> Sae:
    """Train one SAE with sae-lens's SAETrainer on any iterator of (batch, d_in) activations."""
    import tempfile

    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(cfg.seed)
    sae = _training_sae(d_in, width, cfg, hook, model)
    if init_b_dec is not None:
        with torch.no_grad():
            sae.b_dec.copy_(init_b_dec.to(sae.b_dec))
    steps = cfg.n_tokens // cfg.batch_size
    tcfg = SAETrainerConfig(
        total_training_samples=steps * cfg.batch_size, train_batch_size_samples=cfg.batch_size, lr=cfg.lr,
        lr_end=cfg.lr / 10, lr_scheduler_name="constant", lr_warm_up_steps=int(cfg.lr_warm_up_frac * steps),
        lr_decay_steps=int(cfg.lr_decay_frac * steps), device=cfg.device,
        logger=LoggingConfig(log_to_wandb=False), dead_feature_window=max(50, steps // 4),
        feature_sampling_window=max(50, steps // 4), n_batches_for_norm_estimate=20)
    trainer = SAETrainer(tcfg, sae, batches)
    if not progress:
        trainer._update_pbar = lambda *a, **k: None  # noqa: SLF001 - quiet mode for tests
    trainer.fit()
    with tempfile.TemporaryDirectory() as tmp:
        trainer.sae.save_inference_model(tmp)  # BatchTopK -> JumpReLU thresholds, per-latent activations
        # Saved folded (apply_b_dec_to_input=False): stitching mixes latents of SAEs whose b_dec differ.
        out = Sae.load(tmp).folded()
    out.metadata.pop("source", None)
    out.metadata["training"] = asdict(cfg)
    return out


@torch.no_grad()
def evaluate_sae(sae: Sae, acts: torch.Tensor, chunk: int = 8192) -> dict[str, float]:
    """L0, MSE, FVU and dead fraction of an SAE on (n, d) activations."""
    if acts.ndim != 2 or acts.shape[1] != sae.d_in:
        raise SaeError(f"activations of shape {tuple(acts.shape)} do not match SAE d_in {sae.d_in}")
    mean = acts.mean(0)
    se = var = l0 = 0.0
    fired = torch.zeros(sae.width, dtype=torch.bool)
    for b in range(0, acts.shape[0], chunk):
        x = acts[b:b + chunk].float()
        a = sae.encode(x)
        se += float(((x - sae.decode(a)) ** 2).sum())
        var += float(((x - mean) ** 2).sum())
        nz = a > 0
        l0 += float(nz.sum())
        fired |= nz.any(0).cpu()
    n = acts.shape[0]
    return {"l0": l0 / n, "mse": se / n, "fvu": se / max(var, 1e-12), "dead_frac": float((~fired).float().mean())}


@torch.no_grad()
def ce_with_reconstruction(lm, hook: str, tokens: torch.Tensor, recon_fn: Callable[[torch.Tensor], torch.Tensor],
                           batch_ctx: int = 8) -> dict[str, float]:
    """Mean next-token loss clean and with `recon_fn(resid)` spliced in at `hook` (position 0 left clean)."""
    clean = spliced = 0.0
    n = 0
    for b in range(0, tokens.shape[0], batch_ctx):
        tok = tokens[b:b + batch_ctx]
        resid = lm.resid(tok, hook).float()
        new = resid.clone()
        new[:, 1:] = recon_fn(resid[:, 1:])
        clean += float(lm.token_losses_from(tok, hook, resid).sum())
        spliced += float(lm.token_losses_from(tok, hook, new).sum())
        n += tok.shape[0] * (tok.shape[1] - 1)
    return {"ce_clean": clean / n, "ce_loss": spliced / n, "ce_delta": (spliced - clean) / n}


def ladder_widths(d_model: int, n: int, start_mult: int = 2) -> list[int]:
    """Widths d·start_mult·2^i, i < n (the demo: 576·2 = 1152, 2304, 4608, 9216)."""
    return [d_model * start_mult * 2**i for i in range(n)]


def train_ladder(store, widths: Sequence[int], cfg: TrainConfig, out_dir: str | Path, hook: str, model: str,
                 eval_ctx: int = 0, progress: bool = True, log: Callable[[str], None] = print,
                 only: Sequence[int] | None = None) -> list[Sae]:
    """Train (or resume) one SAE per width on an ActivationStore; each saved to out_dir/<width> as it finishes.

    `only` trains just those widths (with the seeds they have in the full ladder), so separate single-threaded
    processes can train different widths side by side and the ladder is the same as one process would make.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    saes = []
    init_b_dec = None
    for i, width in enumerate(tqdm(list(widths), desc="ladder", disable=not progress)):
        path = out_dir / str(width)
        if only is not None and width not in only:
            continue
        if (path / "sae_weights.safetensors").is_file():
            saes.append(Sae.load(path))
            continue
        if init_b_dec is None:
            # Geometric-median-like init (the mean) speeds early training; computed once, cheaply.
            first = next(store.provider(cfg.batch_size * 4, seed=cfg.seed, skip_ctx=eval_ctx,
                                        max_norm_ratio=cfg.max_norm_ratio))
            init_b_dec = first.mean(0)
        t = time.time()
        wcfg = TrainConfig(**{**asdict(cfg), "seed": cfg.seed + i})
        batches = store.provider(cfg.batch_size, seed=cfg.seed + i, skip_ctx=eval_ctx, max_norm_ratio=cfg.max_norm_ratio)
        sae = train_sae(batches, store.d_model, width,
                        wcfg, hook=hook, model=model, init_b_dec=init_b_dec, progress=progress)
        sae.save(path)
        log(f"trained width {width} in {time.time() - t:.0f}s")
        saes.append(sae)
    return saes


def import_ladder(specs: Sequence[str]) -> list[Sae]:
    """SAEs from sae-lens: each spec is a local folder or 'release/sae_id' (hub cache; HF_HUB_OFFLINE honoured).

    Each is folded to apply_b_dec_to_input=False (same outputs), the form stitching needs.
    """
    out = []
    for spec in specs:
        if Path(spec).exists():
            out.append(Sae.load(spec).folded())
        else:
            release, sep, sae_id = spec.partition(":")
            if not sep:
                raise SaeError(f"{spec!r} is neither a folder nor 'release:sae_id'")
            out.append(Sae.from_pretrained(release, sae_id).folded())
    widths = [s.width for s in out]
    if widths != sorted(widths) or len(set(widths)) != len(widths):
        raise SaeError(f"a ladder needs strictly growing widths, got {widths}")
    hooks = {s.hook_name for s in out if s.hook_name}
    if len(hooks) > 1:
        raise SaeError(f"the ladder's SAEs read different hooks: {sorted(hooks)}")
    return out
