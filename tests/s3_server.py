"""A real S3 server on loopback for the object-storage tests: moto's server mode on a free port
(as zarr-python and s3fs test themselves), and `FaultProxy`, an HTTP proxy in front of it that
fails a share of requests, loses answers, delays each request, counts requests, drops the headers
of conditional writes (as S3-compatible servers that ignore them do), kills a process at the n-th
write, or answers chosen requests itself (`FaultPlan.answer`: a 403, a 409, a 501).
`python tests/s3_server.py PORT TARGET_PORT DELAY_MS` serves the proxy with a delay alone, in its
own process (what `make bench-s3` uses for its latency rows)."""

from __future__ import annotations

import http.client
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Distinctive fake credentials: the tests look for them in everything the pipeline writes.
ACCESS_KEY = "AKIADNFTESTKEY0000001"
SECRET_KEY = "dnf-test-secret-9f3c2a7e-never-in-files"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """moto's S3 server on 127.0.0.1 (in a thread of this process)."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.port}"

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """The environment a client needs (the pipeline's subprocesses get it too)."""
        return {"AWS_ENDPOINT_URL": endpoint or self.url, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def stop(self) -> None:
        self.server.stop()


@dataclass
class FaultPlan:
    """What the proxy does: fail every `fail_every`-th request with a 503 before forwarding it,
    forward every `lose_every`-th write and answer 503 anyway (the answer is lost: the client
    retries a write that happened), kill process `kill_pid` when write number `kill_at` arrives
    (it is not forwarded: the process dies before it)."""

    fail_every: int = 0
    lose_every: int = 0
    delay_s: float = 0.0  # held before forwarding: object storage's latency per request
    kill_at: int = 0
    kill_pid: int = 0
    drop_conditional: bool = False  # forward writes without If-None-Match / If-Match (as some servers)
    # answer(method, path, lowercase headers) -> (status, XML body) to answer instead of the server
    # (the request is not forwarded), or None to go on as planned
    answer: Callable[[str, str, dict], tuple[int, bytes] | None] | None = None
    requests: int = 0
    writes: int = 0
    log: list[tuple[str, str, int, bool]] = field(default_factory=list)  # method, path, status, conditional
    lock: threading.Lock = field(default_factory=threading.Lock)


class FaultProxy:
    """An HTTP proxy to `target` that applies a `FaultPlan` (set `plan` between runs)."""

    def __init__(self, target_port: int, port: int = 0, plan: FaultPlan | None = None):
        self.plan = plan or FaultPlan()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _any(self) -> None:
                proxy.handle(self, target_port)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", port or free_port()), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def handle(self, h: BaseHTTPRequestHandler, target_port: int) -> None:
        body = self._body(h)
        write = h.command in ("PUT", "POST", "DELETE")
        plan = self.plan
        with plan.lock:
            plan.requests += 1
            plan.writes += write
            n, w = plan.requests, plan.writes
        if plan.answer is not None:
            got = plan.answer(h.command, h.path, {k.lower(): v for k, v in h.headers.items()})
            if got is not None:
                with plan.lock:
                    plan.log.append((h.command, h.path.split("?")[0], got[0], "if-none-match" in
                                     {k.lower() for k in h.headers}))
                self._reply(h, *got)
                return
        if write and plan.kill_at and w == plan.kill_at and plan.kill_pid:
            os.kill(plan.kill_pid, signal.SIGKILL)
            h.close_connection = True
            return
        if plan.delay_s:
            time.sleep(plan.delay_s)
        if plan.fail_every and n % plan.fail_every == 0:
            self._reply(h, 503, b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>")
            return
        conn = http.client.HTTPConnection("127.0.0.1", target_port, timeout=60)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("connection", "transfer-encoding")}
        headers["Content-Length"] = str(len(body))
        conditional = "if-none-match" in {k.lower() for k in headers}  # what the client asked for
        if plan.drop_conditional:
            headers = {k: v for k, v in headers.items() if k.lower() not in ("if-none-match", "if-match")}
        conn.request(h.command, h.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        with plan.lock:
            plan.log.append((h.command, h.path.split("?")[0], resp.status, conditional))
        if write and plan.lose_every and w % plan.lose_every == 0 and resp.status < 300:
            self._reply(h, 503, b"<Error><Code>ServiceUnavailable</Code><Message>lost</Message></Error>")
            return
        h.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("connection", "transfer-encoding", "content-length", "server", "date"):
                h.send_header(k, v)
        h.send_header("Content-Length", resp.getheader("Content-Length", "0") if h.command == "HEAD"
                      else str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    @staticmethod
    def _body(h: BaseHTTPRequestHandler) -> bytes:
        if "chunked" not in h.headers.get("Transfer-Encoding", ""):
            return h.rfile.read(int(h.headers.get("Content-Length") or 0))
        out = b""
        while True:
            size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                h.rfile.readline()
                return out
            out += h.rfile.read(size)
            h.rfile.readline()

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, status: int, data: bytes) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/xml")
        h.send_header("Content-Length", "0" if h.command == "HEAD" else str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def s3_error(status: int, code: str, message: str = "") -> tuple[int, bytes]:
    """An S3 error answer for `FaultPlan.answer`."""
    return status, f"<Error><Code>{code}</Code><Message>{message or code}</Message></Error>".encode()


if __name__ == "__main__":
    port, target, delay_ms = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    FaultProxy(target, port, FaultPlan(delay_s=delay_ms / 1000)).thread.join()
