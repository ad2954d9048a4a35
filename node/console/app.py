"""The console's HTTP server: Starlette, Jinja2 templates, uvicorn in a thread of
``serve``.

Routes: ``/`` (the status page), ``/metrics`` (Prometheus), ``/healthz``.
Access: a client on the loopback interface needs nothing more; any other client
needs ``Authorization: Bearer <token>`` (``console.token_file``), else 401.  The
configuration refuses a non-loopback ``bind_address`` without a token file.  HTTPS
when ``console.certificate`` and ``console.private_key`` are set.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import socket
import threading
from pathlib import Path

import uvicorn
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

from node.config import Config
from node.console.data import BodyParts, page
from node.errors import StartError
from node.jobs import JobStore
from node.metrics import NodeMetrics

logger = logging.getLogger(__name__)

TEMPLATES = Path(__file__).with_name("templates")


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_app(config: Config, jobs: JobStore, metrics: NodeMetrics,
              token: str | None) -> Starlette:
    """The console application.

    Parameters
    ----------
    config
        The node's configuration (destinations, models, console section).
    jobs
        The node's own job store (read only here).
    metrics
        The node's metrics, rendered at ``/metrics``.
    token
        The bearer token required of clients beyond loopback (``None``: only loopback
        clients are served).
    """
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape())
    template = env.get_template("index.html")
    body_parts = BodyParts()

    def allowed(request: Request) -> bool:
        if _is_loopback(request.client.host if request.client else None):
            return True
        if token is None:
            return False
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip(), token)

    def unauthorised() -> Response:
        return PlainTextResponse("401 Unauthorized: send Authorization: Bearer <token>\n",
                                 status_code=401, headers={"WWW-Authenticate": "Bearer"})

    async def index(request: Request) -> Response:
        if not allowed(request):
            return unauthorised()
        data = await asyncio.to_thread(page, config, jobs, body_parts)
        data["charts"] = {k: Markup(v) for k, v in data["charts"].items()}  # built escaped
        return HTMLResponse(template.render(**data),
                            headers={"Cache-Control": "no-store",
                                     "Content-Security-Policy": "default-src 'none'; "
                                     "style-src 'unsafe-inline'; img-src data:"})

    async def metrics_endpoint(request: Request) -> Response:
        if not allowed(request):
            return unauthorised()
        body = await asyncio.to_thread(metrics.render)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    return Starlette(routes=[Route("/", index), Route("/metrics", metrics_endpoint),
                             Route("/healthz", healthz)])


class ConsoleServer:
    """uvicorn serving :func:`build_app` from a thread; the port is bound in
    :meth:`start` so that a taken port is a :class:`StartError` naming it."""

    def __init__(self, config: Config, jobs: JobStore, metrics: NodeMetrics) -> None:
        from node.cli import read_token

        console = config.console
        token = read_token(console.token_file) if console.token_file else None
        self.app = build_app(config, jobs, metrics, token)
        self.config = config
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.address: tuple[str, int] | None = None

    def start(self) -> tuple[str, int]:
        console = self.config.console
        family = socket.AF_INET6 if ":" in console.bind_address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((console.bind_address, console.port))
        except OSError as exc:
            sock.close()
            raise StartError(f"console.port {console.port} on {console.bind_address} cannot be "
                             f"bound ({exc.strerror}): set another console.port") from None
        sock.listen(64)
        sock.setblocking(False)
        self.address = sock.getsockname()[:2]
        server = uvicorn.Server(uvicorn.Config(
            self.app, log_level="warning", access_log=False, lifespan="off",
            ssl_certfile=str(console.certificate) if console.certificate else None,
            ssl_keyfile=str(console.private_key) if console.private_key else None))
        self._server = server
        self._thread = threading.Thread(target=lambda: asyncio.run(server.serve([sock])),
                                        name="console", daemon=True)
        self._thread.start()
        scheme = "https" if console.certificate else "http"
        logger.info("status console at %s://%s:%d/ (metrics at /metrics)%s", scheme,
                    self.address[0], self.address[1],
                    "" if console.loopback_only else "; bearer token required beyond loopback")
        return self.address

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
