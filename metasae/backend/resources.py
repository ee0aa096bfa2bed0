"""What the service holds in memory: the atlas (opened at start), and — loaded on first need, released after
an idle timeout — the language model, the SAEs of each width and the meta-SAE.

Every request and job wraps its work in ``Resources.use()``; the idle reaper releases weights only when no
request or job is inside one and nothing was used for ``idle_timeout_s``. Loads are single-flight: two requests
that need the same SAE wait for one load. Weights are read with safetensors through sae-lens (never pickles).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from metasae.atlas import Manifest
from metasae.backend.config import Settings
from metasae.backend.errors import ApiError, field_error, free_cuda_cache, is_oom

log = logging.getLogger("metasae.backend")

ATLAS_WAIT_S = 60.0


def pick_device(spec: str) -> str:
    """`auto` -> "cuda" when torch sees a GPU, else "cpu"; explicit cuda without a GPU is an error."""
    import torch

    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} asked for, but torch sees no CUDA GPU (torch {torch.__version__})")
    if spec != "cpu" and not spec.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    return spec


def device_name(device: str) -> str:
    import os
    import platform

    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU {platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def load_language_model(source: str, device: str):
    """The model an atlas manifest names (any spec metasae.model_spec understands), on the backend's device."""
    from metasae.model_spec import load_model

    return load_model(source, device=device)


def load_problem(e: BaseException) -> str:
    """One line on why a model could not be loaded (transformers' own messages run to paragraphs)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if "trust_remote_code" in str(e) or "custom code" in str(e):
        return f"{type(e).__name__}: it needs custom code (trust_remote_code), which metasae never runs"
    return f"{type(e).__name__}: {text[:300]}"


def load_sae(path_of: Callable[[], Path], what: str, device: str = "cpu"):
    """Load a sae-lens folder after the cheap checks `verify` makes (no pickles, a sane header, shapes agreeing
    with cfg.json); anything wrong with the weights is a 503 that starts with `what` and says why."""
    import json

    from metasae.atlas import SAE_FILES, AtlasError, check_weights
    from metasae.sae import Sae, SaeError

    try:
        folder = path_of()
        cfg = json.loads((folder / SAE_FILES[0]).read_text(encoding="utf-8"))
        problems = check_weights(folder / SAE_FILES[1], cfg if isinstance(cfg, dict) else {}, finite=False)
        if problems:
            raise SaeError(f"{SAE_FILES[1]}: " + "; ".join(problems))
        return Sae.load(folder, device=device)
    except (AtlasError, SaeError, OSError, ValueError) as e:  # ValueError: cfg.json that is not JSON
        raise ApiError(503, f"{what} cannot be loaded ({e})") from e


class Resources:
    """Lazily loaded model, SAEs and meta-SAE of one atlas, shared by all requests and jobs (thread-safe)."""

    def __init__(self, settings: Settings, device: str | None = None):
        self.settings = settings
        self.device = device or pick_device(settings.device)
        self.atlas_ready = threading.Event()
        self.atlas_error: str | None = None
        self._atlas: Any = None
        self._loaded: dict[str, Any] = {}
        self._loading: dict[str, float] = {}
        self._load_locks: dict[str, threading.Lock] = {}
        self._labels: dict[int, np.ndarray] = {}
        self._meta_labels: np.ndarray | None = None
        self._lock = threading.Lock()
        self._active = 0
        self.last_used = time.monotonic()
        self.n_released = 0

    @property
    def device_name(self) -> str:
        return device_name(self.device)

    # -- atlas ----------------------------------------------------------------------------------------

    def open_atlas(self) -> None:
        """Open the atlas (sha256-verified); called once in a background thread at start."""
        from metasae.atlas import Atlas

        self._loading["atlas"] = time.monotonic()
        try:
            self._atlas = Atlas.open(self.settings.atlas)
            log.info("atlas %s open: widths %s", self.settings.atlas, self._atlas.widths)
        except Exception as e:  # noqa: BLE001 - reported by /health and every /v1 route
            self.atlas_error = f"{type(e).__name__}: {e}"
            log.error("cannot open atlas %s: %s", self.settings.atlas, self.atlas_error)
        finally:
            self._loading.pop("atlas", None)
            self.atlas_ready.set()

    def atlas(self, wait: float = ATLAS_WAIT_S):
        if not self.atlas_ready.wait(wait):
            raise ApiError(503, "the atlas is still loading; retry in a few seconds")
        if self.atlas_error:
            raise ApiError(503, f"the atlas {self.settings.atlas} could not be opened: {self.atlas_error}")
        return self._atlas

    @property
    def manifest(self) -> Manifest:
        return self.atlas().manifest

    @property
    def hook(self) -> str:
        return str(self.manifest.model.hook)

    @property
    def d_model(self) -> int:
        d = self.manifest.model.d_model
        return int(d) if d else int(self.meta().d_in)

    def sae_widths(self) -> list[int]:
        return sorted(s.width for s in self.manifest.saes)

    def check_width(self, width: int, field: str = "width") -> int:
        widths = self.sae_widths()
        if width not in widths:
            raise field_error(field, f"{width} is not a width of this atlas (widths: {widths})")
        return width

    # -- lazy weights ---------------------------------------------------------------------------------

    def _get(self, key: str, loader: Callable[[], Any]) -> Any:
        obj = self._loaded.get(key)
        if obj is not None:
            return obj
        with self._lock:
            lock = self._load_locks.setdefault(key, threading.Lock())
        with lock:
            obj = self._loaded.get(key)
            if obj is not None:
                return obj
            self._loading[key] = time.monotonic()
            t = time.perf_counter()
            try:
                if self.settings.load_delay_s:
                    time.sleep(self.settings.load_delay_s)
                obj = loader()
            finally:
                self._loading.pop(key, None)
            log.info("loaded %s on %s in %.1fs", key, self.device, time.perf_counter() - t)
            with self._lock:
                self._loaded[key] = obj
            return obj

    def is_loaded(self, key: str) -> bool:
        """Whether `model`, `meta_sae` or `sae:<width>` is in memory now."""
        return key in self._loaded

    def lm(self):
        """The atlas's language model (loaded on first need); one that cannot be loaded is a 503 saying why."""
        m = self.manifest.model
        source = str(m.source or m.name)

        def load():
            try:
                lm = load_language_model(source, self.device)
            except Exception as e:
                if is_oom(e):
                    raise
                raise ApiError(503, f"model: the atlas's language model {source!r} cannot be loaded here "
                                    f"({load_problem(e)})") from e
            if m.d_model and lm.d_model != m.d_model:
                raise ApiError(503, f"model: {source} has d_model {lm.d_model}, the atlas says {m.d_model}")
            return lm

        return self._get("model", load)

    def sae(self, width: int, field: str = "width"):
        """The SAE of one width (loaded on first need); unknown widths are a 422 naming `field`, weights that
        cannot be loaded a 503 naming it."""
        self.check_width(width, field)
        atlas = self.atlas()
        return self._get(f"sae:{width}", lambda: load_sae(lambda: atlas.sae_path(width),
                                                            f"{field}: the SAE of width {width}", self.device))

    def meta(self):
        """The atlas's meta-SAE (loaded on first need)."""
        atlas = self.atlas()
        return self._get("meta_sae", lambda: load_sae(atlas.meta_sae_path, "meta_sae: the atlas's meta-SAE",
                                                  self.device))

    def latent_labels(self, width: int) -> np.ndarray:
        """Label of every latent of one width, indexed by latent id (from latents.parquet)."""
        labels = self._labels.get(width)
        if labels is None:
            df = self.atlas().latents_table(width, ["latent", "label"])
            n = int(df.latent.max()) + 1 if len(df) else 0
            labels = np.full(n, "", dtype=object)
            labels[df.latent.to_numpy()] = df.label.fillna("").to_numpy()
            self._labels[width] = labels
        return labels

    def meta_labels(self) -> np.ndarray:
        if self._meta_labels is None:
            df = self.atlas().meta_latents_table(["meta_latent", "label"])
            n = int(df.meta_latent.max()) + 1 if len(df) else 0
            labels = np.full(n, "", dtype=object)
            labels[df.meta_latent.to_numpy()] = df.label.fillna("").to_numpy()
            self._meta_labels = labels
        return self._meta_labels

    def preload(self) -> None:
        with self.use():
            self.meta()
            for w in self.sae_widths():
                self.sae(w)
            self.lm()

    # -- use and idle release -------------------------------------------------------------------------

    @contextmanager
    def use(self) -> Iterator[Resources]:
        """Hold the weights (no idle release) for the duration of a request or job."""
        with self._lock:
            self._active += 1
            self.last_used = time.monotonic()
        try:
            yield self
        finally:
            with self._lock:
                self._active -= 1
                self.last_used = time.monotonic()

    def release_if_idle(self, now: float | None = None) -> bool:
        """Drop model and SAEs when nothing used them for idle_timeout_s (0 disables); True if released."""
        timeout = self.settings.idle_timeout_s
        if timeout <= 0:
            return False
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._active or self._loading or not self._loaded or now - self.last_used < timeout:
                return False
            released = sorted(self._loaded)
            self._loaded.clear()
            self.n_released += 1
        free_cuda_cache()
        log.info("idle for %.0fs: released %s", now - self.last_used, ", ".join(released))
        return True

    def status(self) -> dict[str, Any]:
        """What /health reports about loading."""
        loaded = dict(self._loaded)
        loading = sorted(self._loading)
        if self.atlas_error:
            status = "error"
        elif not self.atlas_ready.is_set() or loading:
            status = "loading"
        else:
            status = "ready"
        return {
            "status": status,
            "device": self.device,
            "device_name": self.device_name,
            "atlas": str(Path(self.settings.atlas)),
            "atlas_error": self.atlas_error,
            "loading": loading,
            "loaded": {
                "model": "model" in loaded,
                "meta_sae": "meta_sae" in loaded,
                "saes": sorted(int(k.split(":")[1]) for k in loaded if k.startswith("sae:")),
            },
            "idle_timeout_s": self.settings.idle_timeout_s,
            "released": self.n_released,
        }
