"""POST /v1/encode: a decoder row of the atlas (width, latent) or any d_model vector -> meta-latents."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool

from metasae.backend.deps import computing
from metasae.backend.errors import field_error
from metasae.backend.resources import Resources


async def encode(req: Any, res: Resources) -> dict:
    """`req` is an EncodeLatent or EncodeVector body (schemas.encode_body)."""
    # Microseconds of CPU work once the weights are loaded: answer on the event loop (no thread hop, no GIL
    # convoy under bursts). Loading, or a GPU (whose sync could wait behind a job), goes to the thread pool.
    needed = ["meta_sae"] + ([f"sae:{req.width}"] if req.width is not None else [])
    if res.device == "cpu" and res.atlas_ready.is_set() and all(res.is_loaded(k) for k in needed):
        return encode_sync(req, res)
    return await run_in_threadpool(encode_sync, req, res)


def encode_sync(req: Any, res: Resources) -> dict:
    import torch

    from metasae.meta import decompose

    with computing(res, "encoding"):
        meta = res.meta()
        if req.vector is None:
            sae = res.sae(req.width)
            if req.latent >= sae.width:  # the one rule the schema cannot say (the range depends on the width)
                raise field_error("latent", f"{req.latent} is out of range: width {req.width} has latents "
                                            f"0..{sae.width - 1}")
            v = sae.W_dec[req.latent].to(meta.W_dec.device, torch.float32)
        else:
            if len(req.vector) != meta.d_in:  # the schema says so too, when d_model was known at start
                raise field_error("vector", f"has {len(req.vector)} values, the atlas's d_model is {meta.d_in}")
            v = torch.tensor(req.vector, dtype=torch.float32, device=meta.W_dec.device)
        with torch.inference_mode():
            w, i = decompose(meta, v, max_terms=req.max_terms)
            recon = meta.reconstruct(v[None])[0]
            denom = float((v * v).sum())
            fvu = float(((v - recon) ** 2).sum()) / denom if denom > 0 else 0.0
        weights, ids = w[0].cpu().tolist(), i[0].cpu().tolist()
        labels = res.meta_labels()
        terms = [{"id": int(m), "weight": float(x), "label": str(labels[m]) if m < len(labels) else ""}
                 for x, m in zip(weights, ids, strict=True) if x > 0]
    return {"meta_latents": terms, "fvu": fvu, "d_model": meta.d_in}
