"""Publish and fetch atlases as Hugging Face dataset repos (the folder is the repo's content)."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, IncompleteSnapshotError

from metasae.atlas import MANIFEST, AtlasError, verify

REPO_TYPE = "dataset"
# Atlas data files a push replaces; anything else in the repo (README.md, .gitattributes) is left alone.
# ("*" matches across "/" in huggingface_hub's patterns, so "*/.*" is any hidden name at any depth.)
DATA_PATTERNS = ["*.parquet", "saes/**", "meta_sae/**"]
HIDDEN_PATTERNS = [".*", "*/.*"]


def _problems(problems: list[str], limit: int = 8) -> str:
    return "\n  ".join(problems[:limit]) + (f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else "")


def push(atlas_dir: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = True,
         commit_message: str | None = None) -> str:
    """Verify ``atlas_dir``, create the dataset repo if needed, upload the data files, then the manifest.

    As on disk, manifest.json goes last (its own commit: large uploads may be split into several commits), so
    a pull in between fails verification instead of passing with a mix. Atlas data files in the repo that the
    new atlas lacks (an old width, say) are deleted. Returns the URL of the manifest commit.
    """
    root = Path(atlas_dir)
    problems = verify(root)
    if problems:
        raise AtlasError(f"{root}: refusing to push to {repo_id}, the atlas does not verify:\n  {_problems(problems)}")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type=REPO_TYPE, private=private, exist_ok=True)
    message = commit_message or f"metasae atlas from {root.name}"
    api.upload_folder(
        repo_id=repo_id, folder_path=str(root), repo_type=REPO_TYPE, commit_message=f"{message} (data)",
        allow_patterns=DATA_PATTERNS, ignore_patterns=HIDDEN_PATTERNS, delete_patterns=DATA_PATTERNS,
    )
    info = api.upload_file(
        path_or_fileobj=str(root / MANIFEST), path_in_repo=MANIFEST, repo_id=repo_id, repo_type=REPO_TYPE,
        commit_message=f"{message} (manifest)",
    )
    return str(getattr(info, "commit_url", info))


def pull(repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
         local_files_only: bool | None = None, token: str | None = None, checksums: bool = True) -> Path:
    """Download (or find in the hub cache) an atlas dataset repo and verify it; returns the snapshot folder.

    ``local_files_only=None`` follows huggingface_hub's own default (offline when HF_HUB_OFFLINE=1).
    """
    kwargs: dict = {"repo_type": REPO_TYPE, "revision": revision, "cache_dir": cache_dir, "token": token}
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    try:
        path = Path(snapshot_download(repo_id, **kwargs))
    except (HfHubHTTPError, HFValidationError, IncompleteSnapshotError, OSError, ValueError) as e:
        # LocalEntryNotFoundError (offline, not cached) is an OSError; bad repo ids are ValueErrors.
        raise AtlasError(f"{where}: could not download the atlas dataset repo ({type(e).__name__}: {e})") from e
    problems = verify(path, checksums=checksums)
    if problems:
        raise AtlasError(f"{where}: the downloaded snapshot {path} is not a valid atlas:\n  {_problems(problems)}")
    return path
