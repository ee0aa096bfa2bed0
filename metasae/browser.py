"""Run the dashboard as a real server for a real browser: used by the browser tests and the screenshot script.

`start_streamlit` launches `streamlit run app.py` on an atlas at a free localhost port and waits for its health
check; the Chromium constants are those Debian's package needs headless (Playwright cannot download browsers here).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_streamlit(atlas: Path, log: Path, timeout_s: float = 120, warm_backend: bool = False,
                    extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`streamlit run app.py` on ``atlas`` (output to ``log``); returns the process and its base URL once healthy.

    ``warm_backend=False`` keeps the app from starting its backend (and loading the model) in the background."""
    port = free_port()
    env = {**os.environ, "METASAE_ATLAS": str(atlas), "OMP_NUM_THREADS": "1",
           "METASAE_WARM_BACKEND": "1" if warm_backend else "0", **(extra_env or {})}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
             "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
             "--server.fileWatcherType", "none"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(base + "/_stcore/health", timeout=2)
            return proc, base
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                raise RuntimeError(f"streamlit did not start:\n{log.read_text(errors='replace')[-3000:]}") from None
            time.sleep(0.3)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
