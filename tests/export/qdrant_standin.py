"""A stand-in Qdrant server on 127.0.0.1 for the load tests: the REST calls pipeline/export/targets.py makes,
answered by qdrant-client's own local mode (an in-memory store), so the real client talks HTTP to it and
the points, search and counts are Qdrant's. It can die or hang at a chosen upsert, and a new stand-in on
the same store and port plays the restarted server. No Qdrant server runs on this machine."""

from __future__ import annotations

import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROUTES = [
    ("GET", r"/", "version"),
    ("GET", r"/collections/(?P<name>[^/]+)/exists", "exists"),
    ("GET", r"/collections/(?P<name>[^/]+)", "info"),
    ("PUT", r"/collections/(?P<name>[^/]+)", "create"),
    ("PUT", r"/collections/(?P<name>[^/]+)/points", "upsert"),
    ("POST", r"/collections/(?P<name>[^/]+)/points/delete", "delete"),
    ("POST", r"/collections/(?P<name>[^/]+)/points/query", "query"),
    ("POST", r"/collections/(?P<name>[^/]+)/points/count", "count"),
]


class Store:
    """The stand-in's data: outlives a stand-in that dies, as a real server's storage does."""

    def __init__(self):
        from qdrant_client import QdrantClient

        self.client = QdrantClient(":memory:")
        self.upserts = 0  # upsert requests answered, over every stand-in on this store
        self.lock = threading.Lock()


def _call(store: Store, action: str, name: str, body: dict):
    from qdrant_client import models

    c = store.client
    if action == "version":
        from importlib.metadata import version

        return {"title": "qdrant stand-in", "version": version("qdrant-client")}  # a server the client accepts
    if action == "exists":
        return {"exists": c.collection_exists(name)}
    if action == "info":
        return c.get_collection(name).model_dump(mode="json", exclude_none=True)
    if action == "create":
        return c.create_collection(name, vectors_config=models.VectorParams(**body["vectors"]))
    if action == "upsert":
        c.upsert(name, points=[models.PointStruct(**p) for p in body["points"]])
        store.upserts += 1
        return {"operation_id": store.upserts, "status": "completed"}
    if action == "delete":
        c.delete(name, points_selector=models.FilterSelector(filter=models.Filter(**body["filter"])))
        return {"operation_id": 0, "status": "completed"}
    if action == "query":
        request = models.QueryRequest(**body)
        found = c.query_points(name, query=request.query, limit=request.limit, with_payload=False)
        return found.model_dump(mode="json", exclude_none=True)
    if action == "count":
        return {"count": c.count(name, exact=True).count}
    raise AssertionError(action)


class StandIn:
    """Serve ``store`` on 127.0.0.1:``port`` (0: a free port). ``die_at``: the n-th upsert request (1-based,
    counted on this stand-in) gets no answer and the server goes away, refusing connections from then on;
    ``hang_at``: that upsert gets no answer until :meth:`release`."""

    def __init__(self, store: Store, port: int = 0, die_at: int | None = None, hang_at: int | None = None):
        self.store, self.die_at, self.hang_at = store, die_at, hang_at
        self.seen_upserts = 0
        self.released, self.stopped = threading.Event(), threading.Event()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _route(self, method: str):
                path = self.path.split("?")[0].rstrip("/") or "/"
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                for m, pattern, action in ROUTES:
                    match = re.fullmatch(pattern, path)
                    if m == method and match:
                        return standin.answer(self, action, match.groupdict().get("name", ""), body)
                self.send_error(404)

            def do_GET(self):
                self._route("GET")

            def do_PUT(self):
                self._route("PUT")

            def do_POST(self):
                self._route("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, handler: BaseHTTPRequestHandler, action: str, name: str, body: dict) -> None:
        if action == "upsert":
            self.seen_upserts += 1
            if self.seen_upserts == self.die_at:
                self.die(handler)
                return
            if self.seen_upserts == self.hang_at:
                self.released.wait(60)
                return
        with self.store.lock:
            result = _call(self.store, action, name, body)
        # every answer is wrapped in {"result": ...} except the root's version information
        data = json.dumps(result if action == "version" else {"result": result, "status": "ok", "time": 0.0}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def die(self, handler: BaseHTTPRequestHandler) -> None:
        """Drop the request unanswered and stop listening, as a killed server does."""
        handler.close_connection = True
        handler.connection.shutdown(socket.SHUT_RDWR)
        threading.Thread(target=self.stop, daemon=True).start()

    def release(self) -> None:
        self.released.set()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.stopped.set()


def silent_port() -> tuple[socket.socket, int]:
    """A loopback port that accepts TCP connections (the kernel completes them) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock, sock.getsockname()[1]
