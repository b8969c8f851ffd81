"""A stand-in for the Hugging Face Hub's file endpoint, for offline downloader tests.

It answers HEAD and GET on /datasets/<owner>/<name>/resolve/<revision>/<path> the way
huggingface_hub expects (X-Repo-Commit, an ETag, Content-Length, byte ranges), from an
in-memory {path: bytes} map. It binds 127.0.0.1 on an ephemeral port, logs every
request, can misbehave on purpose (drop a connection once, stall mid-file), and shuts
itself down after `max_seconds` even if a test forgets to.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_RESOLVE = re.compile(r"^/datasets/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


class StandIn:
    def __init__(self, files: dict[str, bytes], max_seconds: float = 60.0):
        self.files = dict(files)
        self.log: list[tuple[str, str, str, str | None]] = []  # (method, repo, path, Range header)
        self.drop_once: dict[str, int] = {}  # path -> bytes sent before the first GET is cut off
        self.stall: dict[str, int] = {}  # path -> bytes sent before the GET hangs until released
        self.stalled = threading.Event()
        self.release = threading.Event()
        self.max_seconds = max_seconds
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def gets(self, path: str) -> list[str | None]:
        """Range headers of every GET of `path` (None = whole file)."""
        return [rng for method, _, p, rng in self.log if method == "GET" and p == path]

    def __enter__(self) -> "StandIn":
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_HEAD(self):
                standin._serve(self, body=False)

            def do_GET(self):
                standin._serve(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self._timer = threading.Timer(self.max_seconds, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.release.set()
        self._timer.cancel()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        m = _RESOLVE.match(h.path.split("?")[0])
        rng = h.headers.get("Range")
        self.log.append(("GET" if body else "HEAD", m["repo"] if m else "", m["path"] if m else h.path, rng))
        data = self.files.get(m["path"]) if m else None
        if data is None:
            h.send_response(404)
            h.send_header("X-Error-Code", "EntryNotFound")
            h.send_header("X-Repo-Commit", COMMIT)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        start = int(re.match(r"bytes=(\d+)-", rng)[1]) if rng else 0
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(len(data) - start))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if not body:
            return
        path = m["path"]
        if path in self.drop_once:
            cut = self.drop_once.pop(path)
            h.wfile.write(data[start:start + cut])
            self._hang_up(h)
        elif path in self.stall:
            h.wfile.write(data[start:start + self.stall[path]])
            h.wfile.flush()
            self.stalled.set()
            self.release.wait(self.max_seconds)
            self._hang_up(h)
        else:
            h.wfile.write(data[start:])

    @staticmethod
    def _hang_up(h: BaseHTTPRequestHandler) -> None:
        h.wfile.flush()
        h.close_connection = True
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
