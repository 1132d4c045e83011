"""The slide viewer from Python: a server on 127.0.0.1 in a background thread, and a notebook display of it."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histoscan.errors import ConfigError


@dataclass
class ViewerServer:
    """A running viewer: its ``url`` (the slide list), and ``stop()``."""

    url: str
    server: Any = field(repr=False)
    thread: threading.Thread = field(repr=False)

    def slide_url(self, slide: str) -> str:
        """The viewer page of one slide."""
        from urllib.parse import quote

        return f"{self.url}/{quote(slide, safe='')}"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server and wait for its thread."""
        self.server.should_exit = True
        self.thread.join(timeout)


def open_viewer(
    folder: str | Path,
    port: int = 0,
    *,
    api_key: str | None = None,
    cache_mb: float = 128.0,
    workers: int = 2,
    timeout: float = 30.0,
) -> ViewerServer:
    """Serve the scanned slides of ``folder`` (the ``--out`` folder of ``histoscan slide``) on 127.0.0.1.

    Args:
        folder: The folder of scanned slides.
        port: The port (0: any free one).
        api_key: A key the API routes then need (the page asks for it).
        cache_mb: Memory for encoded tiles, in MB.
        workers: Threads that read and encode tiles.
        timeout: Longest wait for the server to start, in s.

    Returns:
        The running server; ``.url`` is the slide list, ``.stop()`` ends it.
    """
    import uvicorn

    from histoscan.serving.slides.routes import SlideSettings, create_viewer_app

    app = create_viewer_app(SlideSettings(str(folder), cache_mb, workers, 256, api_key))  # checks the folder
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"open_viewer: port {port} on 127.0.0.1 is not free ({exc.strerror})") from exc
    bound = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="histoscan-viewer")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise ConfigError(f"open_viewer: the viewer of {folder} did not start within {timeout:g} s")
        time.sleep(0.05)
    return ViewerServer(f"http://127.0.0.1:{bound}/slides", server, thread)


def show_viewer(folder: str | Path | ViewerServer, slide: str | None = None, height: int = 640, **options: Any) -> Any:
    """An ``IPython.display.IFrame`` of the viewer (a running one, or one started with ``open_viewer(folder)``).

    Args:
        folder: The folder of scanned slides, or a server ``open_viewer`` returned.
        slide: One slide's viewer instead of the list.
        height: The frame's height in px.
        **options: Passed to ``open_viewer`` when a folder is given.

    Returns:
        The IFrame (a notebook shows it when it is the cell's last value).
    """
    try:
        from IPython.display import IFrame
    except ImportError as exc:
        raise ConfigError(
            "show_viewer needs IPython (pip install ipython); open_viewer(folder).url works without"
        ) from exc
    viewer = folder if isinstance(folder, ViewerServer) else open_viewer(folder, **options)
    return IFrame(viewer.slide_url(slide) if slide else viewer.url, width="100%", height=height)
