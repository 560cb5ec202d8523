"""Serving a study folder over http on this machine (127.0.0.1 only): the standard library's
static file server, restricted to the folder."""

from __future__ import annotations

import functools
import http.server
import os
from pathlib import Path

from medlsdm.errors import MedlsdmError


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # one line per file would drown the terminal
        pass


def study_server(study: str | os.PathLike, port: int = 8765) -> http.server.ThreadingHTTPServer:
    """A server for ``study`` bound to 127.0.0.1:``port`` (0 = any free port), not yet started."""
    study = Path(study)
    if not (study / "study.json").is_file() or not (study / "index.html").is_file():
        raise MedlsdmError(f"{study}: not a reader-study folder (no study.json / index.html); "
                           f"build one with `medlsdm reader-study build`")
    handler = functools.partial(_QuietHandler, directory=str(study.resolve()))
    try:
        return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as exc:
        raise MedlsdmError(f"--port {port}: cannot listen on 127.0.0.1 ({exc.strerror or exc})") from None


def serve_study(study: str | os.PathLike, port: int = 8765) -> None:
    """Serve until interrupted (Ctrl-C)."""
    server = study_server(study, port)
    host, bound = server.server_address[:2]
    print(f"serving {study} at http://{host}:{bound}/index.html (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
