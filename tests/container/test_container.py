"""The GPU container built and run for real: scripts/container_check.sh under pytest.

It builds the image (~10-15 min from a cold cache on 2 cores, ~7 GB of disk), so it runs only when asked
(METASAE_CONTAINER_CHECK=1) and a Docker engine answers; .ci/run runs the script itself after the test suite.
Without an engine: as root, `apt-get install docker.io debootstrap docker-compose` and start `dockerd` in the
background (docs/deploy.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "container_check.sh"


def _engine_problem() -> str | None:
    """Why no container can run here, or None."""
    docker = shutil.which("docker")
    if docker is None:
        return "no docker client (apt-get install docker.io)"
    try:
        r = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                           timeout=30)
    except subprocess.TimeoutExpired:
        return "the Docker engine does not answer within 30 s"
    if r.returncode != 0:
        return f"no Docker engine answers (start dockerd as root): {r.stderr.strip()[:200]}"
    for tool in ("docker-compose", "debootstrap"):
        if shutil.which(tool) is None and not os.environ.get("METASAE_BASE_IMAGE"):
            return f"{tool} not installed (apt-get install {tool})"
    return None


def test_container_check_script_passes():
    if os.environ.get("METASAE_CONTAINER_CHECK") != "1":
        pytest.skip("builds and runs the image (~15 min, ~7 GB): set METASAE_CONTAINER_CHECK=1 "
                    "(.ci/run runs scripts/container_check.sh after the suite)")
    problem = _engine_problem()
    if problem:
        pytest.skip(problem)
    r = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    for line in ("healthy after", "/v1/encode", "/v1/activations", "401 without it", "app page in Chromium",
                 "stopped in", "compose single: healthy", "container check passed"):
        assert line in out, f"{line!r} missing from:\n{out[-4000:]}"
    if os.environ.get("METASAE_CHECK_SPLIT", "1") == "1":
        line = "through the Ray head: done"
        assert line in out, f"{line!r} missing from:\n{out[-4000:]}"
