"""The atlas's torch weights: its meta-SAE, and the decoder rows of one SAE of the ladder as numpy.

Imports torch on first call, so the pages and modules that only read tables never pay for it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from metasae.atlas import Atlas, AtlasError


def load_meta_sae(atlas: Atlas) -> Any:
    """The atlas's meta-SAE as a ``metasae.sae.Sae`` (imports torch; cache the result)."""
    from metasae.sae import Sae, SaeError

    try:
        return Sae.load(atlas.meta_sae_path())
    except SaeError as e:
        raise AtlasError(str(e)) from e


def load_decoder(atlas: Atlas, width: int) -> np.ndarray:
    """Decoder rows (width, d_model) of one SAE of the ladder, float32 (cache the result)."""
    from metasae.sae import Sae, SaeError

    try:
        return Sae.load(atlas.sae_path(width)).W_dec.float().numpy().copy()
    except SaeError as e:
        raise AtlasError(str(e)) from e
