"""An ASGI app on a real uvicorn server in a thread of the test (for HTTP-level tests)."""

from __future__ import annotations

import threading
import time

import uvicorn
from fastapi import FastAPI

from support.ports import free_port


class Served:
    """``app`` served on 127.0.0.1 at a free port until ``stop()``."""

    def __init__(self, app: FastAPI, access_log: bool = False) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=self.port,
                log_config=None,
                access_log=access_log,
                lifespan="off",
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("uvicorn did not start in 20 s")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
