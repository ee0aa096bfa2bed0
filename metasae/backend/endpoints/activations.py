"""POST /v1/activations: run text through the model to the atlas's hook and encode it with one SAE."""

from __future__ import annotations

from typing import Any

from metasae.backend.config import Settings
from metasae.backend.deps import computing
from metasae.backend.errors import field_error
from metasae.backend.resources import Resources


def token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` the way the atlas's corpus was tokenised (no special tokens)."""
    from metasae.corpus import _encode

    return [int(t) for t in _encode(tokenizer, [text])[0]]


def activations(req: Any, res: Resources, settings: Settings) -> dict:
    """`req` is the ActivationsRequest body of this atlas (schemas.activations_body)."""
    import torch

    res.check_width(req.width)
    with computing(res, "computing activations"):
        lm = res.lm()
        sae = res.sae(req.width)
        ids = token_ids(lm.tokenizer, req.text)
        if not ids:
            raise field_error("text", "gives no tokens")
        if len(ids) > settings.max_tokens:
            raise field_error("text", f"gives {len(ids)} tokens, the limit is {settings.max_tokens}", 413)
        with torch.inference_mode():
            x = lm.resid(torch.tensor([ids]), res.hook)[0]
            acts = sae.encode(x.to(sae.W_enc.device))
            vals, idx = acts.topk(min(req.top_k, sae.width), dim=-1)
        vals, idx = vals.float().cpu().numpy(), idx.cpu().numpy()
        labels = res.latent_labels(req.width)
        top = [[{"latent": int(j), "activation": float(a), "label": str(labels[j]) if j < len(labels) else ""}
                for a, j in zip(va, ia, strict=True) if a > 0] for va, ia in zip(vals, idx, strict=True)]
        return {"width": req.width, "tokens": lm.decode_tokens(ids), "token_ids": ids, "top": top}
