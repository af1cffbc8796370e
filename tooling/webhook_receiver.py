"""A local webhook receiver for the tests: an HTTP server that records every JSON POST.

Stands for the hospital's endpoint of the node's ``Notifications``. It can answer the first
``failures`` calls with HTTP 500 and wait ``delay`` seconds before answering, so retries and
timeouts are exercised against a real socket.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class WebhookReceiver(ThreadingHTTPServer):
    """Records ``{"path", "content_type", "body"}`` per POST; use it as a context manager (a serving thread)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.calls: list[dict[str, Any]] = []
        self.failures = 0
        self.delay = 0.0

    @property
    def url(self) -> str:
        """Where to send the webhooks."""
        return f"http://127.0.0.1:{self.server_address[1]}/abscess-node-events"

    @property
    def bodies(self) -> list[dict[str, Any]]:
        """The JSON bodies received, in order."""
        return [call["body"] for call in self.calls]

    def __enter__(self) -> "WebhookReceiver":
        threading.Thread(target=self.serve_forever, name="webhook-receiver", daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: WebhookReceiver

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.calls.append({"path": self.path, "content_type": self.headers["Content-Type"], "body": body})
        time.sleep(self.server.delay)
        failing = self.server.failures > 0
        self.server.failures -= 1
        self.send_response(500 if failing else 204)
        self.end_headers()
