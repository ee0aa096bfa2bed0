"""Hub push/pull without network: a hand-built hub cache for pull, recorded HfApi calls for push."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import HfApi

from metasae import hub
from metasae.atlas import Atlas, AtlasError
from metasae.synthetic_atlas import make_synthetic_atlas

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "someone/tiny-atlas"


@pytest.fixture(scope="module")
def atlas_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_atlas(tmp_path_factory.mktemp("atlas") / "a", seed=5, with_weights=False)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable at import time, so set the constant it consults too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _cache_with(atlas_dir: Path, cache: Path, repo: str = REPO) -> Path:
    """Lay out ``atlas_dir`` the way snapshot_download caches a dataset repo: snapshots/<commit> + refs/main."""
    storage = cache / ("datasets--" + repo.replace("/", "--"))
    snapshot = storage / "snapshots" / COMMIT
    shutil.copytree(atlas_dir, snapshot)
    (snapshot / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n")  # as on the hub
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_pull_finds_the_cached_snapshot_offline(atlas_dir: Path, tmp_path: Path) -> None:
    snapshot = _cache_with(atlas_dir, tmp_path)
    path = hub.pull(REPO, cache_dir=tmp_path)
    assert path == snapshot
    assert hub.pull(REPO, revision=COMMIT, cache_dir=tmp_path, local_files_only=True) == snapshot
    assert Atlas.open(path).latent(128, 7)["label"] == "Albert Einstein physicist"


def test_pull_unknown_repo_names_it(tmp_path: Path) -> None:
    with pytest.raises(AtlasError, match="someone/missing"):
        hub.pull("someone/missing", cache_dir=tmp_path)
    with pytest.raises(AtlasError, match="not a valid"):
        hub.pull("not a valid/repo id!!", cache_dir=tmp_path)


def test_pull_rejects_a_damaged_snapshot(atlas_dir: Path, tmp_path: Path) -> None:
    snapshot = _cache_with(atlas_dir, tmp_path)
    (snapshot / "examples.parquet").write_bytes(b"truncated")
    with pytest.raises(AtlasError) as info:
        hub.pull(REPO, cache_dir=tmp_path)
    assert REPO in str(info.value) and "examples.parquet" in str(info.value)


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def method(self, name: str):
        def record(api: HfApi, *args, **kwargs):
            self.calls.append((name, args, kwargs))
            return type("Info", (), {"commit_url": f"https://hub/{name}"})()
        return record


def test_push_creates_a_dataset_repo_and_uploads_data_then_manifest(atlas_dir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _Recorder()
    for name in ("create_repo", "upload_folder", "upload_file"):
        monkeypatch.setattr(HfApi, name, rec.method(name))
    url = hub.push(atlas_dir, REPO, token="t0ken")
    assert [c[0] for c in rec.calls] == ["create_repo", "upload_folder", "upload_file"]
    (_, args, kwargs) = rec.calls[0]
    assert args == (REPO,) and kwargs["repo_type"] == "dataset" and kwargs["private"] is True
    assert kwargs["exist_ok"] is True
    folder = rec.calls[1][2]
    assert folder["folder_path"] == str(atlas_dir) and folder["repo_type"] == "dataset" and folder["repo_id"] == REPO
    assert "manifest.json" not in folder["allow_patterns"] and "*.parquet" in folder["allow_patterns"]
    assert ".*" in folder["ignore_patterns"]
    manifest = rec.calls[2][2]
    assert manifest["path_in_repo"] == "manifest.json" and manifest["repo_type"] == "dataset"
    assert manifest["path_or_fileobj"] == str(atlas_dir / "manifest.json")
    assert url == "https://hub/upload_file"


@pytest.fixture
def hub_calls(monkeypatch: pytest.MonkeyPatch) -> _Recorder:
    """The HfApi calls a push makes, recorded instead of sent."""
    rec = _Recorder()
    for name in ("create_repo", "upload_folder", "upload_file"):
        monkeypatch.setattr(HfApi, name, rec.method(name))
    return rec


def test_push_refuses_a_bad_atlas_without_calling_the_hub(atlas_dir: Path, tmp_path: Path,
                                                          hub_calls: _Recorder) -> None:
    bad = Path(shutil.copytree(atlas_dir, tmp_path / "bad"))
    (bad / "latents.parquet").write_bytes(b"")
    with pytest.raises(AtlasError, match="latents.parquet"):
        hub.push(bad, REPO)
    assert hub_calls.calls == []


def test_push_refuses_an_atlas_with_a_link_out_of_it(atlas_dir: Path, tmp_path: Path, hub_calls: _Recorder) -> None:
    """upload_folder follows links: a link to ~/.ssh/id_rsa inside the atlas would upload the key."""
    bad = Path(shutil.copytree(atlas_dir, tmp_path / "bad"))
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    (bad / "saes").mkdir(exist_ok=True)
    (bad / "saes" / "key.txt").symlink_to(secret)
    with pytest.raises(AtlasError, match=r"saes/key.txt: a symbolic link .* outside the atlas"):
        hub.push(bad, REPO)
    assert hub_calls.calls == []
