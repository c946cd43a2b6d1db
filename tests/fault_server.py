"""An OpenAI-compatible HTTP endpoint that injects faults: a proxy, or a scripted server.

As a **proxy** (`upstream=` a real server, e.g. vLLM's) it forwards every request and
answers with the real server's reply, except where a fault is due: an HTTP 500 or 429,
a dropped connection, a delay past the client's timeout, a reply cut off mid-JSON. Run
as a script (`python fault_server.py --upstream URL --port N [--die-after N]`) it is a
separate process, so a test can kill it with SIGKILL: to the client, the server died.

As a **scripted server** (no upstream) it answers `/models` and `/completions` itself,
with text built from the request's model and seed. It is not a model: it stands in for
one only in the fast tests of the HTTP client (retries, validation, concurrency, the
API key), where what matters is what was sent and what comes back over real HTTP; the
slow tests run the same faults in front of a real vLLM server.

Faults are queued per completion request: `faults` is consumed one entry per request
("ok", an HTTP status such as "500" or "429", "drop", "cut" (a body cut off), "slow",
"truncated", "two-choices", "no-text", "unfinished", "short", "no-usage"); with
`fault_every=N` every Nth request gets `repeat_fault` instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FaultServer:
    def __init__(
        self,
        upstream: str | None = None,
        *,
        models: list[dict[str, Any]] | None = None,
        delay: float = 0.0,
        slow_delay: float = 2.0,
        die_after: int | None = None,
        fault_every: int = 0,
        repeat_fault: str = "500",
        port: int = 0,
    ):
        self.upstream = upstream.rstrip("/") if upstream else None
        self.models = models or [{"id": "base", "root": "/models/base", "parent": None}]
        self.delay = delay
        self.slow_delay = slow_delay
        self.die_after = die_after
        self.fault_every = fault_every
        self.repeat_fault = repeat_fault
        self.faults: deque[str] = deque()
        self.bodies: list[dict[str, Any]] = []  # completion requests received, in order
        self.headers: list[dict[str, str]] = []
        self.completions = 0  # completion requests answered with a real reply
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> FaultServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- what a request gets -------------------------------------------------------------

    def _next_fault(self) -> str:
        with self._lock:
            number = len(self.bodies)
            if self.faults:
                return self.faults.popleft()
            if self.fault_every and number % self.fault_every == 0:
                return self.repeat_fault
            return "ok"

    def _scripted_reply(self, body: dict[str, Any]) -> dict[str, Any]:
        text = f" {body.get('model')} seed {body.get('seed')}"
        tokens = int(body.get("max_tokens", 16))
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "stop_reason": None}
        if "messages" in body:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {
            "id": "cmpl-scripted",
            "object": "text_completion",
            "choices": [choice],
            "usage": {"prompt_tokens": 4, "completion_tokens": tokens, "total_tokens": tokens + 4},
        }

    def _forward(self, method: str, path: str, data: bytes | None, headers: dict[str, str]):
        assert self.upstream is not None
        root = self.upstream.removesuffix("/v1")
        url = f"{root}{path}"
        forwarded = {
            k: v for k, v in headers.items() if k.lower() in ("content-type", "authorization")
        }
        request = urllib.request.Request(url, data=data, method=method, headers=forwarded)
        try:
            with urllib.request.urlopen(request, timeout=600) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, status: int, payload: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                if self.path == "/stats":  # for a test driving this server in another process
                    stats = {"requests": len(server.bodies), "completions": server.completions}
                    self._send(200, json.dumps(stats).encode())
                elif server.upstream:
                    self._send(*server._forward("GET", self.path, None, dict(self.headers)))
                elif self.path.endswith("/models"):
                    self._send(200, json.dumps({"object": "list", "data": server.models}).encode())
                else:
                    self._send(404, b'{"error": "not found"}')

            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(data)
                with server._lock:
                    server.bodies.append(body)
                    server.headers.append(dict(self.headers))
                fault = server._next_fault()
                # Concurrency is counted while the request waits out the delay, before any
                # reply is written: a client cannot have sent its next request by then.
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                time.sleep(server.delay)
                with server._lock:
                    server.in_flight -= 1
                self._answer(fault, data, body)

            def _answer(self, fault: str, data: bytes, body: dict[str, Any]) -> None:
                if fault.isdigit():  # an HTTP status: "500", "503", "429", "401" ...
                    self._send(int(fault), b'{"error": {"message": "injected fault"}}')
                    return
                if fault == "cut":  # headers promise a body the connection never finishes
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", "4096")
                    self.end_headers()
                    self.wfile.write(b'{"choices": [')
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault == "slow":
                    time.sleep(server.slow_delay)
                if server.upstream:
                    status, payload = server._forward("POST", self.path, data, dict(self.headers))
                    reply = json.loads(payload) if status == 200 else None
                else:
                    status, reply = 200, server._scripted_reply(body)
                    payload = json.dumps(reply).encode()
                if status != 200 or reply is None:
                    self._send(status, payload)
                    return
                choice = reply["choices"][0]
                if fault == "truncated":
                    payload = payload[: len(payload) // 2]
                elif fault == "two-choices":
                    reply["choices"] = [choice, choice]
                elif fault == "no-text":
                    choice.pop("text", None)
                    choice.pop("message", None)
                elif fault == "unfinished":
                    choice["finish_reason"] = None
                elif fault == "short":
                    choice["finish_reason"] = "length"
                    reply["usage"]["completion_tokens"] = 1
                elif fault == "no-usage":
                    reply.pop("usage", None)
                if fault not in ("ok", "slow", "truncated"):
                    payload = json.dumps(reply).encode()
                if server.die_after is None:
                    with server._lock:
                        server.completions += 1
                    self._send(200, payload)
                    return
                # Dying after exactly N answers: count, answer and exit under the lock, or
                # a concurrent handler slips an answer out between the Nth and the exit.
                with server._lock:
                    if server.completions < server.die_after:
                        server.completions += 1
                        self._send(200, payload)
                    if server.completions >= server.die_after:
                        os._exit(1)  # the server dies: every other connection drops

        return Handler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--die-after", type=int)
    parser.add_argument("--fault-every", type=int, default=0)
    parser.add_argument("--fault", default="500")
    args = parser.parse_args()
    server = FaultServer(
        args.upstream,
        die_after=args.die_after,
        fault_every=args.fault_every,
        repeat_fault=args.fault,
        port=args.port,
    )
    print(f"ready {server.url}", flush=True)
    sys.stdout.flush()
    server.httpd.serve_forever()


if __name__ == "__main__":
    main()
