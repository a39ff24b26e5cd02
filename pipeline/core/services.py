"""The services a command talks to, reached one way everywhere: checked before any work, watched during it.

A wrong address (a typo in a port, a server not started) stops the command within ``services.timeout_s``
seconds, with one line that names the setting, the address and what was tried, before anything is written.
Without the check, ``ray.init`` on a wrong port retries for minutes and the Qdrant client fails with a
traceback (issue 26). A service that goes away mid-run stops the command with one line as well; what was
finished stays on disk (every stage writes atomically) and the rerun continues from it.

- Ray (``sweep.ray_address``, ``corpus.ray_address``): the address Ray itself connects to (Ray resolves
  ``auto`` and turns a loopback address into this machine's address unless multi-node clusters are off)
  must accept a TCP connection and answer a gRPC health check. A Ray GCS answers it; a Ray Client server
  (``ray://``) answers "unimplemented", which is an answer too.
- HTTP (Qdrant's ``targets.qdrant_url``, an MLflow tracking server): an answer below 500 to a GET.

The stages call :func:`preflight` through pipeline/stages.py; the Ray helpers (pipeline/core/raycluster.py),
the Qdrant loader and the tracking store use :func:`check` and :class:`Watch` from here.
"""

from __future__ import annotations

import http.client
import logging
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Literal

from pipeline.core.config import Config
from pipeline.core.errors import ConfigError, ServiceError

log = logging.getLogger(__name__)
TIMEOUT_KEY = "services.timeout_s"
# After a lost service interrupts the main thread, how long it may take to leave the watched block before
# the process exits on its own: with its GCS gone, Ray can block in C++ for a minute and then kill the process.
GRACE_S = 3.0
POLL_S = 1.0


@dataclass(frozen=True)
class Service:
    """One service a command talks to: the setting that names it and where it is probed."""

    setting: str  # the config key (or environment variable) the address came from
    address: str  # as the user gave it; "" for a cluster this command started itself
    what: str  # "Ray cluster", "Qdrant server", ...
    protocol: Literal["grpc", "http"]
    target: str  # grpc: host:port; http: the URL that is fetched
    hint: str = ""  # what the user can do, appended to the message

    @property
    def named(self) -> str:
        return f"{self.setting}={self.address}" if self.address else f"the {self.what} ({self.setting} unset)"

    def host_port(self) -> tuple[str, int]:
        if self.protocol == "http":
            parts = urllib.parse.urlsplit(self.target)
            return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
        host, _, port = self.target.rpartition(":")
        return host.strip("[]"), int(port)


# ------------------------------------------------------------------------------------------------- probes

def _tcp(host: str, port: int, timeout: float) -> str | None:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except socket.gaierror as exc:
        return f"host name {host!r} not found ({exc.strerror})"
    except ConnectionRefusedError:
        return f"TCP connect to {host}:{port} refused"
    except TimeoutError:
        return f"no TCP connection to {host}:{port} within {timeout:g} s"
    except OSError as exc:
        return f"TCP connect to {host}:{port} failed ({exc.strerror or exc})"
    return None


def _grpc(target: str, timeout: float) -> str | None:
    """A gRPC health check (grpc.health.v1, which Ray's GCS serves); any status from a gRPC server is an
    answer, only "unavailable" (not gRPC, or gone) and a deadline are not."""
    import grpc

    with grpc.insecure_channel(target) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=bytes,
                                    response_deserializer=bytes)
        try:
            check(b"", timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return f"{target} accepted the TCP connection but gave no gRPC answer within {timeout:g} s"
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                detail = " ".join((exc.details() or "").split())[-160:]
                return f"no gRPC answer from {target} ({detail})"
    return None


def _http(url: str, timeout: float) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            return f"no answer to GET {url} within {timeout:g} s"
        return f"GET {url} failed ({exc.reason})"
    except TimeoutError:
        return f"GET {url}: the server accepted the connection but sent no answer within {timeout:g} s"
    except (http.client.HTTPException, OSError) as exc:
        return f"GET {url} got no HTTP answer ({type(exc).__name__}: {exc})"
    return None if status < 500 else f"GET {url} answered HTTP {status}"


def probe(service: Service, timeout: float) -> str | None:
    """None when ``service`` answered within ``timeout`` seconds per step, else what went wrong."""
    try:
        host, port = service.host_port()
    except ValueError:
        return f"{service.target!r} is not host:port"
    problem = _tcp(host, port, timeout)
    if problem is None:
        problem = _grpc(service.target, timeout) if service.protocol == "grpc" else _http(service.target, timeout)
    return problem


def check(service: Service, timeout: float) -> None:
    """Raise :class:`ServiceError` (one line: setting, address, what was tried) unless ``service`` answers."""
    started = time.monotonic()
    problem = probe(service, timeout)
    if problem is not None:
        raise ServiceError(unreachable(service, problem, timeout))
    log.debug("%s answered in %.2f s", service.named, time.monotonic() - started)


def unreachable(service: Service, problem: str, timeout: float) -> str:
    return (f"{service.named}: cannot reach the {service.what}: {problem} ({TIMEOUT_KEY}={timeout:g})"
            f"{'; ' + service.hint if service.hint else ''}")


# --------------------------------------------------------------------------------------------- the services

def ray_target(setting: str, address: str) -> str | None:
    """The host:port ``ray.init(address=...)`` connects to, by Ray's own rules; None where Ray starts a
    local cluster instead (``local``)."""
    if address.startswith("ray://"):
        return address[len("ray://"):].split("/")[0]
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError as exc:
        raise ConfigError(f"{setting}={address} needs Ray ({exc}); install the extra: "
                          "pip install -e '.[ray]'") from None
    try:
        return canonicalize_bootstrap_address(address)
    except ConnectionError as exc:  # "auto" with no cluster started on this machine
        raise ServiceError(f"{setting}={address}: no Ray cluster found ({' '.join(str(exc).split())})") from None
    except ValueError as exc:
        raise ConfigError(f"{setting}={address}: not a Ray address ({exc}); e.g. auto, host:6379, "
                          "ray://host:10001") from None


def ray_service(setting: str, address: str | None, target: str | None = None) -> Service | None:
    """The Ray cluster at ``address`` (``target``: where it was found, when already resolved)."""
    target = target or (ray_target(setting, address) if address else None)
    if target is None:
        return None
    named = f" (Ray connects to {target})" if address and target not in address else ""
    hint = ("check the head's address and GCS port (6379 unless `ray start --port` said otherwise), or leave "
            f"{setting} unset to start a local cluster")
    return Service(setting, (address or "") + named, "Ray cluster", "grpc", target, hint)


def qdrant_service(cfg: Config) -> Service | None:
    """The Qdrant server ``targets.qdrant_url`` names; None for Qdrant's local mode."""
    url = cfg.targets.qdrant_url
    if not url:
        return None
    full = url if "://" in url else f"http://{url}"
    return Service("targets.qdrant_url", url, "Qdrant server", "http", full.rstrip("/") + "/",
                   "start Qdrant or fix the URL; unset it to load into Qdrant's local mode under "
                   "exports/<run>/targets/")


def mlflow_service(cfg: Config) -> Service | None:
    """The tracking server, where ``tracking.uri`` (or MLFLOW_TRACKING_URI) names one over HTTP."""
    setting, uri = ("tracking.uri", cfg.tracking.uri) if cfg.tracking.uri else \
        ("MLFLOW_TRACKING_URI", os.environ.get("MLFLOW_TRACKING_URI"))
    if not cfg.tracking.enabled or not uri or not uri.startswith(("http://", "https://")):
        return None
    return Service(setting, uri, "MLflow tracking server", "http", uri.rstrip("/") + "/health",
                   "start it, unset MLFLOW_TRACKING_URI, or set tracking.on_unreachable=local")


# Stages that open MLflow runs; the others never talk to the tracking server.
TRACKED = ("train", "eval", "sweep", "suite", "probe")


def needed(stage: str, cfg: Config) -> list[Service]:
    """The services stage ``stage`` will talk to with ``cfg``; new engines and clusters are added here."""
    found: list[Service | None] = []
    if stage == "sweep" and cfg.sweep.executor == "ray" and cfg.sweep.ray_address:
        found.append(ray_service("sweep.ray_address", cfg.sweep.ray_address))
    if stage == "embed-corpus" and cfg.corpus.executor == "ray" and cfg.corpus.ray_address:
        found.append(ray_service("corpus.ray_address", cfg.corpus.ray_address))
    if stage in ("export", "targets") and "qdrant" in cfg.targets.engines:  # the CLI loads them after an export
        found.append(qdrant_service(cfg))
    if stage in TRACKED and cfg.tracking.on_unreachable == "error":  # "local": tracking falls back by itself
        found.append(mlflow_service(cfg))
    return [s for s in found if s is not None]


def preflight(stage: str, cfg: Config) -> None:
    """Check every service ``stage`` needs before it does any work (one line and exit 2 if one is down)."""
    for service in needed(stage, cfg):
        check(service, cfg.services.timeout_s)


# ------------------------------------------------------------------------------------------------- mid-run

class Watch:
    """While its block runs, probe ``service`` every second. Once it has not answered for ``timeout_s``,
    interrupt the main thread (SIGUSR2): the block then ends with :class:`ServiceError` whatever the library
    in the middle made of the interruption. Should the main thread not leave the block within ``GRACE_S``
    (Ray can block in C++ once its GCS is gone, then kill the process after a minute), print the same line
    and exit 2 from here: what was finished is on disk either way.

    Only the main thread can take the signal; elsewhere the block runs unwatched.
    """

    def __init__(self, service: Service | None, timeout_s: float, kept: str):
        self.service, self.timeout_s, self.kept = service, timeout_s, kept
        self.message: str | None = None
        self._armed = False
        self._left = threading.Event()
        self._previous = None

    @property
    def lost(self) -> bool:
        return self.message is not None

    def __enter__(self) -> Watch:
        if self.service is None or threading.current_thread() is not threading.main_thread():
            return self
        self._main = threading.main_thread().ident
        self._previous = signal.signal(signal.SIGUSR2, self._interrupted)
        self._armed = True
        threading.Thread(target=self._run, name="service-watch", daemon=True).start()
        return self

    def _interrupted(self, signum, frame) -> None:
        if self._armed:  # once the block is left, a late signal is ignored
            self._armed = False
            raise ServiceError(self.message)

    def _run(self) -> None:
        last_answer = time.monotonic()
        while not self._left.wait(POLL_S):
            problem = probe(self.service, self.timeout_s)
            if problem is None:
                last_answer = time.monotonic()
            elif time.monotonic() - last_answer >= self.timeout_s and not self._left.is_set():
                self._lose(problem)
                return

    def _lose(self, problem: str) -> None:
        s = self.service
        self.message = (f"{s.named}: the {s.what} stopped answering mid-run ({problem}; nothing for "
                        f"{self.timeout_s:g} s, {TIMEOUT_KEY}); {self.kept}")
        log.debug("lost %s: %s", s.named, problem)
        signal.pthread_kill(self._main, signal.SIGUSR2)
        if not self._left.wait(GRACE_S):
            sys.stderr.write(f"error: {self.message}\n")
            sys.stderr.flush()
            os._exit(ServiceError.exit_code)

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._armed = False
        self._left.set()
        if self._previous is not None:
            signal.signal(signal.SIGUSR2, self._previous)
        if self.message is not None and exc is not None and not isinstance(exc, ServiceError):
            raise ServiceError(self.message) from exc
        if self.message is not None and exc is None:
            raise ServiceError(self.message)
        return False
