"""`edgevlm serve`: an OpenAI-compatible chat server and a web chat page, on loopback by default."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys

from .common import one_line_errors, requires
from .openai_api import Limits


def parser() -> argparse.ArgumentParser:
    d = Limits()
    p = argparse.ArgumentParser(prog="edgevlm serve", description=(
        "Serve a bundle over an OpenAI-compatible API (POST /v1/chat/completions, streaming or not; GET /v1/models; "
        "GET /health) and a web chat page at /. Binds 127.0.0.1 and answers loopback Host names only unless told "
        "otherwise. Without --bundle the embedded demo bundle is served."))
    p.add_argument("--bundle", metavar="B", help="bundle directory (default: the embedded demo)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; anything else exposes "
                   "the model beyond this machine: pair it with --api-key and --allow-host)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--model-name", metavar="NAME", help="model id clients send (default: the bundle's directory name)")
    p.add_argument("--api-key", metavar="KEY", default=None,
                   help="require Authorization: Bearer KEY on /v1/* (or set EDGEVLM_API_KEY)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web origin allowed to call the API from a browser (CORS), e.g. http://localhost:3000; "
                        "repeatable; default none")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="an extra Host name to answer besides loopback names (repeatable)")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="requests generating at once (default 1: ONNX Runtime already uses every core)")
    p.add_argument("--queue", type=int, default=16, metavar="N", help="requests allowed to wait; beyond: 429 (16)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S", help="deadline per request, seconds (120); "
                   "its body must have arrived by then too (else 408)")
    p.add_argument("--max-connections", type=int, default=256, metavar="N",
                   help="open connections (256); beyond, the one idle longest is closed (503 if none is idle)")
    p.add_argument("--client-timeout", type=float, default=10.0, metavar="S",
                   help="how long a stalled client is waited for (10): a request's headers must arrive within S "
                        "seconds of the connection opening or of the previous response (else 408), and a reply the "
                        "client stops reading for S seconds is cut off")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, metavar="N",
                   help=f"largest request body (default {d.max_body_bytes}); beyond: 413")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, metavar="N",
                   help=f"largest image, width x height (default {d.max_image_pixels}); beyond: 413")
    p.add_argument("--max-images", type=int, default=d.max_images, metavar="N",
                   help=f"images per request (default {d.max_images})")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, metavar="N",
                   help=f"largest max_tokens a request may ask for (default {d.max_tokens})")
    p.add_argument("--cache-dir", metavar="DIR", default=None,
                   help="keep the image and prefix KV caches on disk here too (they survive restarts)")
    p.add_argument("--providers", default=None, metavar="LIST",
                   help="comma-separated onnxruntime execution providers, tried in order; CPU is the fallback")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="server log detail on stderr (default warning; info and debug also log each request)")
    return p


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)  # connections that arrive in a burst wait here, not in SYN retries
    sock.set_inheritable(True)
    return sock


def fit_file_limit(max_connections: int, spare: int = 128) -> int:
    """Each connection holds a file descriptor. Raise the soft limit to fit max_connections plus `spare` (the
    bundle's files, the listening socket, pipes) where the hard limit allows, else fit the connections to it:
    an accept() past the limit makes asyncio stop accepting anyone for a second. -> the connections that fit."""
    try:
        import resource
    except ImportError:  # not POSIX
        return max_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max_connections + spare
    if soft == resource.RLIM_INFINITY or soft >= need:
        return max_connections
    if hard == resource.RLIM_INFINITY or hard >= need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        return max_connections
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    fit = max(1, hard - spare)
    print(f"warning: the open-file limit ({hard}) allows {fit} connections, not {max_connections}", file=sys.stderr)
    return fit


@one_line_errors
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from edgevlm.errors import ArgumentError

    requires("serve", "server")
    from .server import create_app
    for name in ("parallel", "max_body_bytes", "max_image_pixels", "max_images", "max_tokens", "max_connections"):
        if getattr(args, name) < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} must be at least 1")
    if args.queue < 0 or args.timeout <= 0 or args.client_timeout <= 0:
        raise ArgumentError("--queue must be >= 0, --timeout and --client-timeout > 0")
    if not 0 <= args.port <= 65535:
        raise ArgumentError(f"--port must be between 0 and 65535 (0 picks a free one), not {args.port}")
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    api_key = args.api_key or os.environ.get("EDGEVLM_API_KEY") or None
    if not loopback:
        print(f"warning: binding {args.host} makes the server reachable from other machines"
              + ("" if api_key else " without an API key (--api-key)"), file=sys.stderr)

    import edgevlm
    from pathlib import Path

    from edgevlm.model import DEFAULT_BUNDLE

    vlm = edgevlm.load(args.bundle, providers=args.providers.split(",") if args.providers else None,
                       cache_dir=args.cache_dir)
    if args.parallel > 1 and vlm.decoder.shared:
        raise ArgumentError("--parallel > 1 needs an ONNX decoder (llama.cpp / CoreML hold one context)")
    model_id = args.model_name or Path(args.bundle or DEFAULT_BUNDLE).resolve().name
    limits = Limits(args.max_body_bytes, args.max_image_pixels, args.max_images, args.max_tokens)
    app = create_app(vlm, model_id, limits, parallel=args.parallel, queue=args.queue, timeout=args.timeout,
                     api_key=api_key, allow_origins=tuple(args.allow_origin), allow_hosts=tuple(args.allow_host))
    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        raise ArgumentError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    return run(app, sock, model_id, args)


def run(app, sock, model_id: str, args) -> int:
    """Serve `app` on `sock` until Ctrl-C / SIGTERM -> the exit code."""
    import uvicorn

    from .connections import H11_MAX_INCOMPLETE, bounded_h11

    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    # Connections are bounded by BoundedH11 (apps/connections.py): a cap that closes idle connections to admit new
    # ones, a client timeout (headers, stalled readers), a head-size cap. uvicorn's limit_concurrency stays off:
    # it counts idle sockets, so a few hundred of them locked every client out with 503. Work is bounded by the
    # engine's queue (429).
    config = uvicorn.Config(app, log_level=args.log_level, access_log=args.log_level in ("debug", "info"),
                            lifespan="off", server_header=False, timeout_keep_alive=5, timeout_graceful_shutdown=5,
                            http=bounded_h11(fit_file_limit(args.max_connections), args.client_timeout),
                            limit_concurrency=None, h11_max_incomplete_event_size=H11_MAX_INCOMPLETE)
    print(f"edgevlm serve: model {model_id!r} at http://{shown}:{port}/  (API: http://{shown}:{port}/v1)", flush=True)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):  # Ctrl-C / SIGTERM: stop generating, then close connections
            app.state.engine.stop()
            await super().shutdown(sockets=sockets)

    server = Server(config)
    server.run(sockets=[sock])
    # uvicorn re-raises the signal that stopped it once it has shut down; where that signal was ignored when
    # we started (a background job's SIGINT) it comes back here: exit as the signal would have, 128 + its number.
    return 128 + server._captured_signals[-1] if getattr(server, "_captured_signals", None) else 0


if __name__ == "__main__":
    sys.exit(main())
