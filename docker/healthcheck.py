"""Docker HEALTHCHECK: the backend's /health (modes all, backend) or Streamlit's /_stcore/health (mode app).

Exit 0 when it answers 200 within the timeout, 1 otherwise (the standard library only: runs before anything
else is importable and costs ~50 ms). The backend answers /health while its model still loads, so a container
is healthy as soon as it serves requests.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def mode() -> str:
    """The mode the entrypoint noted (it may come from an argument), else METASAE_MODE, else all."""
    try:
        with open(os.path.join(os.environ.get("METASAE_RUN_DIR", "/tmp"), "metasae.mode")) as f:
            return f.read().strip() or "all"
    except OSError:
        return os.environ.get("METASAE_MODE", "all")


def url() -> str:
    if mode() == "app":
        return f"http://127.0.0.1:{os.environ.get('METASAE_APP_PORT', '8501')}/_stcore/health"
    return f"http://127.0.0.1:{os.environ.get('METASAE_BACKEND_PORT', '8000')}/health"


def main() -> int:
    target = url()
    try:
        with urllib.request.urlopen(target, timeout=float(os.environ.get("METASAE_HEALTH_TIMEOUT", "4"))) as r:
            ok = r.status == 200
            body = r.read(200).decode("utf-8", "replace")
    except Exception as e:  # noqa: BLE001 - any failure is "unhealthy", with the reason on stderr
        print(f"unhealthy: {target}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"{'healthy' if ok else 'unhealthy'}: {target}: {body}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
