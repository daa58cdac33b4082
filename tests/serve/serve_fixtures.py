"""A real ``fclm-serve`` (uvicorn, the app of :mod:`serve.app`) on a free loopback port, in a thread."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import uvicorn
from PIL import Image

from serve.app import ServeSettings, create_app, wrap


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(predictor, settings: ServeSettings | None = None) -> Iterator[str]:
    """Serve ``predictor`` on 127.0.0.1; yields the base URL; stops the server on exit."""
    settings = settings or ServeSettings()
    port = free_port()
    config = uvicorn.Config(wrap(create_app(predictor, settings), settings), host="127.0.0.1", port=port,
                            log_level="warning", timeout_keep_alive=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("fclm-serve did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()
