"""``lmforge-serve``: open the run or folder, build the app, and run it under uvicorn until SIGTERM or Ctrl-C."""

from __future__ import annotations

import logging
import signal

from omegaconf import DictConfig

from lmforge.console import setup_console

log = logging.getLogger("lmforge")


def serve(cfg: DictConfig) -> None:
    """Serve ``cfg.run`` (or ``cfg.model.pretrained``) on ``cfg.host:cfg.port`` until stopped.

    SIGTERM and Ctrl-C stop accepting connections, let the requests in flight finish (up to
    ``drain_timeout_s``), stop the batching thread and return, so the process exits 0.
    """
    import uvicorn

    from lmforge.serve.app import create_app
    from lmforge.serve.served import open_served

    setup_console()
    served = open_served(cfg)
    app = create_app(served, cfg)
    log.info("serving %s (%s) at http://%s:%d/v1", served.id, served.what, cfg.host, cfg.port)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, access_log=cfg.access_log,
                            timeout_graceful_shutdown=cfg.drain_timeout_s)  # fmt: skip
    # Once drained, uvicorn raises the signal it caught again, for the handler that was there before
    # it: a handler that does nothing lets a drained server end normally (exit status 0).
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.Server(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
