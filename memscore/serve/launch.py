"""``memscore serve``: start Ray (or join a cluster), run the application, stop it on Ctrl-C.

Everything that can be checked without Ray (the options, the weights files, a local port
already taken) is checked first, so a bad command fails in a second with one line.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import sys
import time

from memscore.errors import MemscoreError
from memscore.serve.config import ServeConfig, parse_replicas
from memscore.serve.model import describe_models

__all__ = ["serve_forever", "APP_NAME"]

#: The Serve application's name (``serve status`` shows it; a cluster may run others beside it).
APP_NAME = "memscore"


def _say(message: str) -> None:
    print(f"memscore serve: {message}", file=sys.stderr, flush=True)


def _check_port_free(host: str, port: int) -> None:
    """Fail now, with one line, where the HTTP proxy could not listen."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise MemscoreError(f"--host {host}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise MemscoreError(
                f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port"
            ) from None


def _url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


def _stop_on_sigterm() -> None:
    """SIGTERM (``kill``, a container stopping) stops the server as Ctrl-C does."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def serve_forever(config: ServeConfig) -> int:
    """Run the server until Ctrl-C or SIGTERM; -> 0 once it has stopped cleanly.

    On a local Ray (the default) Serve and Ray are shut down at the end; joining a cluster
    (``address`` or ``RAY_ADDRESS``) only this application is deleted from it.
    """
    import ray
    from ray import serve

    from memscore.runtime.ray_start import init_ray
    from memscore.serve.app import build
    from memscore.stages.predict import local_cores

    config = config.validated()
    describe_models(config.models, config.weights)
    joined = bool(config.address or os.environ.get("RAY_ADDRESS"))
    low, high = parse_replicas(config.replicas)
    if not joined:
        _check_port_free(config.host, config.port)
        if config.torch_threads is None and high > 1:
            # the replicas share this machine's cores instead of each taking them all
            config = dataclasses.replace(config, torch_threads=max(1, local_cores() // high))
    url = _url(config.host, config.port)
    try:
        _say("joining the Ray cluster" if joined else "starting Ray on this machine")
        init_ray(config.address)
        _stop_on_sigterm()
        serve.start(
            http_options={"host": config.host, "port": config.port}, proxy_location="HeadOnly"
        )
        replicas = f"{low}" if low == high else f"{low}-{high} (autoscaling)"
        _say(
            f"listening on {url} (host {config.host}); loading {','.join(config.models)} in "
            f"{replicas} replica{'s' if high > 1 else ''}; GET /healthz answers 200 once they "
            f"are loaded"
        )
        started = time.perf_counter()
        serve.run(build(config), name=APP_NAME, route_prefix="/")
        from memscore.serve.app import MODEL_DEPLOYMENT

        device = (
            serve.get_deployment_handle(MODEL_DEPLOYMENT, APP_NAME)
            .describe.remote()
            .result()["device"]
        )
        _say(
            f"ready in {time.perf_counter() - started:.1f} s on {device}: open {url}/ or "
            f"curl -F file=@photo.jpg {url}/score; Ctrl-C stops"
        )
        if config.host in ("0.0.0.0", "::"):
            _say(
                "listening on every network interface without authentication: put it behind "
                "your cluster's proxy"
            )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        _say("stopping")
    finally:
        if ray.is_initialized():
            try:
                if joined:
                    serve.delete(APP_NAME)
                else:
                    serve.shutdown()
            finally:
                ray.shutdown()
    _say("stopped")
    return 0
