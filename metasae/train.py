"""SAE ladders: train through sae-lens's SAETrainer on our activation store, import pretrained ones, evaluate.

MSE here is the per-token squared error summed over d_model and averaged over tokens; FVU divides the summed
squared error by the summed squared deviation from the mean activation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
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
    # a latent silent this many training tokens counts as dead and gets the AuxK loss (None: a quarter of training)
    dead_window_tokens: int | None = None
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.architecture not in ("standard", "batchtopk"):
            raise ValueError(f"architecture must be 'standard' or 'batchtopk', got {self.architecture!r}")
        if self.dead_window_tokens is not None and self.dead_window_tokens < self.batch_size:
            raise ValueError(f"dead_window_tokens ({self.dead_window_tokens}) must be at least one batch "
                             f"({self.batch_size})")
        if self.n_tokens < self.batch_size:
            raise ValueError(f"n_tokens ({self.n_tokens}) must be at least one batch ({self.batch_size})")


@dataclass
class DensePath:
    """The dense part of the activations, reconstructed linearly instead of by sparse latents.

    x = mean + P(x - mean) + rest, with P the projector on the `V` (d, r) leading principal components. On
    SmolLM2's layer 15 a plain BatchTopK SAE spends ~19 of its k=32 slots per token on always-on latents that
    tile this subspace; here the sparse SAE is trained on `rest` only and the projection is carried by 2r ReLU
    latents (+v_i and -v_i, threshold 0): relu(p) v - relu(-p) v = p v, an ordinary per-latent SAE, so the
    saved SAE stays in sae-lens format and stitching can add or swap these latents like any other.
    """

    mean: torch.Tensor  # (d,)
    V: torch.Tensor  # (d, r) orthonormal columns

    @property
    def r(self) -> int:
        return int(self.V.shape[1])

    @classmethod
    def fit(cls, sample: torch.Tensor, r: int) -> DensePath:
        """Mean and top-r principal directions of a (n, d) sample."""
        x = sample.double()
        mean = x.mean(0)
        xc = x - mean
        _, vecs = torch.linalg.eigh(xc.T @ xc / len(xc))
        return cls(mean.float(), vecs.flip(1)[:, :r].float().contiguous())

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """What the sparse latents must reconstruct: (x - mean) without its top-r principal components."""
        xc = x - self.mean
        return xc - (xc @ self.V) @ self.V.T

    def compose(self, sparse: Sae) -> Sae:
        """The SAE on raw x: the sparse latents (encoder folded through `residual`) then the 2r dense latents."""
        if sparse.apply_b_dec_to_input:
            sparse = sparse.folded()
        Q = torch.eye(len(self.mean)) - self.V @ self.V.T
        W_enc = Q @ sparse.W_enc
        b_enc = sparse.b_enc - self.mean @ W_enc
        V = self.V
        W_enc = torch.cat([W_enc, V, -V], dim=1)
        proj_bias = self.mean @ V
        b_enc = torch.cat([b_enc, -proj_bias, proj_bias])
        W_dec = torch.cat([sparse.W_dec, V.T, -V.T])
        thr = sparse.threshold if sparse.threshold is not None else torch.zeros(sparse.width)
        threshold = torch.cat([thr, torch.zeros(2 * self.r)])
        meta = dict(sparse.metadata)
        if self.r:
            meta["dense_latents"] = {"first": sparse.width, "count": 2 * self.r,
                                     "why": "linear pathway on the top principal components"}
        return Sae(W_enc=W_enc.contiguous(), b_enc=b_enc, W_dec=W_dec.contiguous(), b_dec=sparse.b_dec + self.mean,
                   threshold=threshold, apply_b_dec_to_input=False, hook_name=sparse.hook_name,
                   model_name=sparse.model_name, metadata=meta)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tmp = path.with_name(path.name + ".tmp")
        save_file({"mean": self.mean.contiguous(), "V": self.V.contiguous()}, str(tmp))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> DensePath:
        from safetensors.torch import load_file

        t = load_file(str(path))
        return cls(t["mean"], t["V"])


def dense_latents(sae: Sae) -> range:
    """Indices of an SAE's dense-pathway latents (empty for SAEs trained without one, or imported)."""
    d = sae.metadata.get("dense_latents") or {}
    return range(int(d.get("first", sae.width)), int(d.get("first", sae.width)) + int(d.get("count", 0)))


def dead_window_steps(cfg: TrainConfig) -> int:
    """Training steps a latent may stay silent before AuxK treats it as dead."""
    steps = cfg.n_tokens // cfg.batch_size
    if cfg.dead_window_tokens is None:
        return max(50, steps // 4)
    return max(1, cfg.dead_window_tokens // cfg.batch_size)


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
        logger=LoggingConfig(log_to_wandb=False), dead_feature_window=dead_window_steps(cfg),
        feature_sampling_window=max(50, steps // 4), n_batches_for_norm_estimate=20)
    trainer = SAETrainer(tcfg, sae, batches)
    curve: list[tuple[int, float]] = []
    show = trainer._update_pbar  # noqa: SLF001

    def record(step_output, pbar, *a, **k) -> None:
        # FVU of the current training batch every 100 steps (scale-free, so sae-lens's input scaling drops out):
        # how far training has converged, for the atlas's "FVU vs training tokens"
        if trainer.n_training_steps % 100 == 0:
            with torch.no_grad():
                x, y = step_output.sae_in.float(), step_output.sae_out.float()
                fvu = float(((x - y) ** 2).sum() / ((x - x.mean(0)) ** 2).sum().clamp_min(1e-12))
            curve.append((trainer.n_training_steps * cfg.batch_size, fvu))
        if progress:
            show(step_output, pbar, *a, **k)

    trainer._update_pbar = record  # noqa: SLF001
    trainer.fit()
    with tempfile.TemporaryDirectory() as tmp:
        trainer.sae.save_inference_model(tmp)  # BatchTopK -> JumpReLU thresholds, per-latent activations
        # Saved folded (apply_b_dec_to_input=False): stitching mixes latents of SAEs whose b_dec differ.
        out = Sae.load(tmp).folded()
    out.metadata.pop("source", None)
    out.metadata["training"] = asdict(cfg)
    out.metadata["training_fvu"] = curve
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


def train_ladder(store, widths: Sequence[int], cfg: TrainConfig, out_dir: str | Path, hook: str, model: str,
                 eval_ctx: int = 0, progress: bool = True, log: Callable[[str], None] = print,
                 only: Sequence[int] | None = None, center_mean: bool = False, dense_pcs: int = 0,
                 seeds: Sequence[int] | None = None, names: Sequence[str] | None = None) -> list[Sae]:
    """Train (or resume) one SAE per width on an ActivationStore; each saved to out_dir/<width> as it finishes.

    `only` trains just those widths (with the seeds they have in the full ladder), so separate single-threaded
    processes can train different widths side by side and the ladder is the same as one process would make.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    saes = []
    init_b_dec = None
    dense = ladder_dense_path(store, cfg, out_dir, eval_ctx, dense_pcs) if center_mean or dense_pcs else None
    seeds = list(seeds) if seeds is not None else [cfg.seed + i for i in range(len(widths))]
    names = list(names) if names is not None else [str(w) for w in widths]
    for i, width in enumerate(tqdm(list(widths), desc="ladder", disable=not progress)):
        path = out_dir / names[i]
        if only is not None and width not in only:
            continue
        if (path / "sae_weights.safetensors").is_file():
            saes.append(Sae.load(path))
            continue
        if dense is not None:
            t = time.time()
            wcfg = TrainConfig(**{**asdict(cfg), "seed": seeds[i]})
            batches = store.provider(cfg.batch_size, seed=seeds[i], skip_ctx=eval_ctx,
                                     max_norm_ratio=cfg.max_norm_ratio)
            sparse = train_sae((dense.residual(b) for b in batches), store.d_model, width - 2 * dense.r, wcfg,
                               hook=hook, model=model, init_b_dec=torch.zeros(store.d_model), progress=progress)
            sae = dense.compose(sparse)
            sae.save(path)
            log(f"trained {names[i]} ({width - 2 * dense.r} sparse + {2 * dense.r} dense latents, centred on the "
                f"data mean) in {time.time() - t:.0f}s")
            saes.append(sae)
            continue
        if init_b_dec is None:
            # Geometric-median-like init (the mean) speeds early training; computed once, cheaply.
            first = next(store.provider(cfg.batch_size * 4, seed=cfg.seed, skip_ctx=eval_ctx,
                                        max_norm_ratio=cfg.max_norm_ratio))
            init_b_dec = first.mean(0)
        t = time.time()
        wcfg = TrainConfig(**{**asdict(cfg), "seed": seeds[i]})
        batches = store.provider(cfg.batch_size, seed=seeds[i], skip_ctx=eval_ctx, max_norm_ratio=cfg.max_norm_ratio)
        sae = train_sae(batches, store.d_model, width,
                        wcfg, hook=hook, model=model, init_b_dec=init_b_dec, progress=progress)
        sae.save(path)
        log(f"trained width {width} in {time.time() - t:.0f}s")
        saes.append(sae)
    return saes


def ladder_dense_path(store, cfg: TrainConfig, out_dir: Path, eval_ctx: int, r: int,
                      n_rows: int = 262_144) -> DensePath:
    """The ladder's shared dense pathway (fit once on training rows, saved beside the SAEs so every rung and every
    resumed process uses the same one)."""
    path = out_dir / "dense.safetensors"
    if path.is_file():
        dense = DensePath.load(path)
        if dense.r == r:
            return dense
    rows, n = [], 0
    for b in store.provider(4096, seed=cfg.seed, skip_ctx=eval_ctx, max_norm_ratio=cfg.max_norm_ratio):
        rows.append(b)
        n += len(b)
        if n >= n_rows:
            break
    dense = DensePath.fit(torch.cat(rows), r)
    dense.save(path)
    return dense


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


def training_curve_table(saes: list[Sae]) -> pd.DataFrame:
    """The atlas's `training_curves` rows (sae_width, tokens, fvu) from each SAE's recorded training-batch FVU
    (`metadata["training_fvu"]`, written by `train_sae`); SAEs without one (imported) contribute no rows."""
    rows = [(s.width, int(t), float(f)) for s in saes for t, f in s.metadata.get("training_fvu") or []]
    return pd.DataFrame(rows, columns=["sae_width", "tokens", "fvu"])
