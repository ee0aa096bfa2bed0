"""pyproject.toml declares the same pinned dependencies that requirements.txt (what setup.sh installs) holds."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def _name(req: str) -> str:
    return re.split(r"[=<>!~\[ ;]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_pyproject_dependencies_match_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    pinned = [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]
    assert sorted(map(str.lower, declared)) == sorted(map(str.lower, pinned))
    assert all("==" in r for r in declared), "every dependency pinned exactly, as in requirements.txt"
    assert len({_name(r) for r in declared}) == len(declared)
    torch = [r for r in project["dependencies"] if _name(r) == "torch"]
    assert torch == [next(p for p in pinned if _name(p) == "torch")]
