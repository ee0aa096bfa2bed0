"""The two errors an atlas raises: an unusable folder, table or manifest, and a key it does not hold."""

from __future__ import annotations


class AtlasError(Exception):
    """An atlas folder, table or manifest is unusable; the message names the file and the problem."""


class UnknownLatentError(KeyError):
    """A width, latent or meta-latent that the atlas does not hold."""

    def __str__(self) -> str:  # KeyError would print the message quoted, as a repr
        return str(self.args[0]) if self.args else ""
