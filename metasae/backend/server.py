"""Serve the backend with uvicorn (what `metasae backend` runs)."""

from __future__ import annotations

import ipaddress
import logging

from metasae.backend.config import Settings

log = logging.getLogger("metasae.backend")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(settings: Settings) -> None:
    """Listen on settings.host:port until SIGINT/SIGTERM; /health answers while the atlas opens."""
    import uvicorn

    from metasae.backend.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not _is_loopback(settings.host) and not settings.token:
        log.warning("listening on %s without METASAE_TOKEN: anyone who can reach this port can use the GPU",
                    settings.host)
    app = create_app(settings)
    res = app.state.resources
    log.info("metasae backend: atlas %s, device %s (%s), http://%s:%d (docs at /docs)", settings.atlas,
             res.device, res.device_name, settings.host, settings.port)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=5,
                timeout_keep_alive=30)
