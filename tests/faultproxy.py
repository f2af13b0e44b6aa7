"""A fault-injecting HTTP proxy for an S3 endpoint on loopback.

:class:`FaultProxy` listens on 127.0.0.1 (a free port) and forwards every request to an upstream
endpoint (the tests' moto server). Clients point ``endpoint_url`` at :attr:`FaultProxy.url`. A
share ``rate`` of the requests (those matching ``match``, a regular expression searched in
``"METHOD /path?query"``) gets one of the fault ``kinds`` instead of, or after, the upstream's
answer:

- ``500``: ``500 InternalError`` with S3's XML error body; the request never reaches upstream.
- ``503``: ``503 SlowDown`` with S3's XML error body; never reaches upstream.
- ``reset``: the connection is reset (TCP RST) with no response at all, either before the
  request reaches upstream, after upstream carried it out (the client cannot know it did), or in
  the middle of the response body.
- ``slow``: ``slow_s`` seconds of silence before the request is forwarded (past a client's read
  timeout, this is a timeout).

Faults are drawn from ``random.Random(seed)``, one draw per matching request in the order they
arrive (plus one to choose a reset's moment), so the same sequence of requests meets the same
faults on every run. A response without a body to cut (``HEAD``, an empty one) is reset before
it is sent instead of mid-body. ``counts``
says what was injected. ``rate``, ``kinds`` and ``match`` can be changed while clients are
connected (:meth:`configure`). No test framework is imported: benchmarks use it as well::

    with FaultProxy("http://127.0.0.1:5000", rate=0.1, seed=1) as proxy:
        fs = s3fs.S3FileSystem(endpoint_url=proxy.url)
"""

from __future__ import annotations

import collections
import http.client
import http.server
import random
import re
import socket
import struct
import threading
import time
import urllib.parse

KINDS = ("500", "503", "reset", "slow")
RESET_MOMENTS = ("before", "after", "mid-body")
"""When a ``reset`` happens: before forwarding, after upstream carried the request out (no
response), or in the middle of the response body."""

_ERROR = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
          "</Message><RequestId>faultproxy</RequestId></Error>")
ERRORS = {
    "500": (500, "Internal Server Error",
            _ERROR.format(code="InternalError", message="We encountered an internal error. Please try again.")),
    "503": (503, "Slow Down", _ERROR.format(code="SlowDown", message="Please reduce your request rate.")),
}
_KEEP = object()
_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
        "te", "trailer", "transfer-encoding", "upgrade", "expect"}


class FaultProxy:
    """A threaded forwarding proxy that injects faults; see the module docstring.

    :param upstream: the endpoint to forward to, ``http://host:port``.
    :param rate: the share of matching requests that get a fault, 0 to 1.
    :param kinds: the faults to choose from (uniformly), a subset of :data:`KINDS`.
    :param seed: seeds the draws.
    :param slow_s: how long a ``slow`` fault waits.
    :param match: a regular expression; only requests whose ``"METHOD /path?query"`` it finds
        can get a fault (``None``: every request).
    """

    def __init__(self, upstream: str, *, rate: float = 0.0, kinds=("500", "503", "reset"), seed: int = 0,
                 slow_s: float = 0.5, match: str | None = None) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"upstream {upstream!r}: an http://host:port URL is accepted")
        self.upstream = (parsed.hostname, parsed.port or 80)
        self.slow_s = slow_s
        self.counts: collections.Counter[str] = collections.Counter()
        """Faults injected so far, by kind (and ``reset-<moment>``), plus ``requests`` seen."""
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self.rate, self.kinds, self.match = 0.0, tuple(kinds), None
        self.configure(rate=rate, kinds=kinds, match=match)
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- control -------------------------------------------------------------------------------
    def configure(self, *, rate: float | None = None, kinds=None, match: str | None | object = _KEEP) -> None:
        """Change the fault rate, kinds or match while the proxy runs; ``match=None`` makes
        every request eligible again; an argument left out keeps its value."""
        with self._lock:
            if rate is not None:
                if not 0.0 <= rate <= 1.0:
                    raise ValueError(f"rate {rate!r}: a number from 0 to 1 is accepted")
                self.rate = float(rate)
            if kinds is not None:
                kinds = tuple(kinds)
                if not kinds or set(kinds) - set(KINDS):
                    raise ValueError(f"kinds {kinds!r}: a non-empty subset of {KINDS} is accepted")
                self.kinds = kinds
            if match is not _KEEP:
                self.match = re.compile(match) if match is not None else None

    @property
    def url(self) -> str:
        """The endpoint clients use: ``http://127.0.0.1:<port>``."""
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def endpoint(self) -> str:
        """The same as :attr:`url` (what boto3 and s3fs call it: ``endpoint_url``)."""
        return self.url

    @property
    def injected(self) -> int:
        """How many faults were injected so far."""
        with self._lock:
            return sum(self.counts[k] for k in KINDS)

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- drawing ------------------------------------------------------------------------------
    def draw(self, method: str, target: str) -> str | None:
        """The fault for this request (``None``: forward it as it is). A reset is returned as
        ``reset-<moment>``."""
        with self._lock:
            self.counts["requests"] += 1
            if self.match is not None and not self.match.search(f"{method} {target}"):
                return None
            if self.rate <= 0.0 or self._random.random() >= self.rate:
                return None
            kind = self._random.choice(self.kinds)
            self.counts[kind] += 1
            if kind == "reset":
                moment = self._random.choice(RESET_MOMENTS)
                self.counts[f"reset-{moment}"] += 1
                return f"reset-{moment}"
            return kind


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # a client that gave up (a timeout) or a connection the proxy reset: nothing to report


class _Handler(http.server.BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue for large uploads

    def log_message(self, format: str, *args) -> None:  # quiet: a test's output stays readable
        pass

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reset(self) -> None:
        """Close with a TCP RST: the client sees 'connection reset by peer'."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _handle(self) -> None:
        body = self._body()
        fault = self.owner.draw(self.command, self.path)
        if fault == "reset-before":
            return self._reset()
        if fault in ERRORS:
            status, reason, xml = ERRORS[fault]
            data = xml.encode()
            self.send_response(status, reason)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":  # a HEAD response has no body, whatever its length says
                self.wfile.write(data)
            return
        if fault == "slow":
            time.sleep(self.owner.slow_s)
        status, reason, headers, data = self._forward(body)
        if fault == "reset-after" or (fault == "reset-mid-body" and (self.command == "HEAD" or len(data) < 2)):
            return self._reset()  # carried out upstream, and no (cuttable) response reaches the client
        self.send_response(status, reason)
        for name, value in headers:
            if name.lower() not in _HOP:
                self.send_header(name, value)
        if self.command != "HEAD" and not any(n.lower() == "content-length" for n, _ in headers):
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault == "reset-mid-body":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            return self._reset()
        self.wfile.write(data)

    def _forward(self, body: bytes):
        conn = http.client.HTTPConnection(*self.owner.upstream, timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()


def main(argv: list[str] | None = None) -> None:
    """``python tests/faultproxy.py UPSTREAM [--rate R] [--kinds 500,503,reset] [--seed N]``:
    serve until interrupted, then print what was injected."""
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("upstream")
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--kinds", default="500,503,reset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slow-s", type=float, default=0.5)
    args = p.parse_args(argv)
    with FaultProxy(args.upstream, rate=args.rate, kinds=args.kinds.split(","), seed=args.seed,
                    slow_s=args.slow_s) as proxy:
        print(proxy.url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
        print(dict(proxy.counts))


if __name__ == "__main__":
    main()
