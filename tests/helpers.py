"""Plain helpers the tests share: paths, running the CLI as a user does, ports, stopping processes.

Fixtures live in conftest.py; everything a test imports lives here (`from helpers import ...`:
pytest puts tests/ on sys.path, see pyproject's `pythonpath`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import psutil

__all__ = [
    "HFEngine", "LORAFLEET", "MLFLOW_SERVER", "MODELS", "REPO", "VENV_BIN", "MlflowServer", "built_base", "cli_env", "free_port",
    "kill_all", "last_json", "mlflow_children", "moto_s3", "processes_mentioning", "run_cli", "stop_tree",
]

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
LORAFLEET = str(VENV_BIN / "lorafleet")
# The home `make test` built the models in, read once at import: in-process CLI tests (`main([... "--home",
# ...])`) move LORAFLEET_HOME for the rest of the session.
MODELS = Path(os.environ.get("LORAFLEET_HOME", REPO / ".lorafleet")).resolve() / "models"


def built_base() -> Path:
    """The pre-trained tiny base model (built if missing)."""
    home = Path(os.environ.get("LORAFLEET_HOME", REPO / ".lorafleet")).resolve()
    base = home / "models" / "tiny"
    if not (base / "config.json").exists():
        subprocess.run([LORAFLEET, "base", "build", "--out", str(base)], check=True, cwd=REPO)
    return base


def cli_env(home: Path) -> dict[str, str]:
    """Environment for running the CLI/jobs as a user would, against ``home``."""
    e = dict(os.environ)
    e["LORAFLEET_HOME"] = str(home)
    e.pop("RAY_ADDRESS", None)  # each CLI run starts its own private local Ray
    return e


def run_cli(args: list[str], env: dict[str, str], timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run `lorafleet ARGS` in the repo root, the way a user does."""
    proc = subprocess.run([LORAFLEET, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"lorafleet {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def last_json(stdout: str) -> dict:
    """The JSON summary a `--json` command prints as its last line (a failure names what came last)."""
    last = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    try:
        return json.loads(last)
    except ValueError:
        raise AssertionError(f"the last line of a --json command is not JSON: {last[:300]!r}") from None


def write_serve_config(path: Path, port: int, **args) -> Path:
    """A one-application `lorafleet serve` config at ``path`` (serve.app:build_app on 127.0.0.1:``port``,
    no access log) with ``args`` as the builder's arguments."""
    import yaml

    path.write_text(yaml.safe_dump({
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": "lorafleet", "route_prefix": "/", "import_path": "serve.app:build_app",
            "logging_config": {"enable_access_log": False}, "args": args,
        }],
    }))
    return path


def free_port(low: int = 20000, high: int = 29999) -> int:
    """A port that is free now and stays so until the server binds it (`lorafleet.cluster.free_port`:
    outside the ranges where Ray's sockets and outgoing connections land); never the same one twice."""
    from lorafleet.cluster import free_port as pick

    return pick(low, high)


def kill_all(procs: Iterable[psutil.Process]) -> None:
    """SIGKILL each process that is still there."""
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def processes_mentioning(text: str) -> list[psutil.Process]:
    """Processes with ``text`` in their command line (e.g. one Ray cluster's temp dir)."""
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(text in part for part in p.info["cmdline"] or []):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return procs


def stop_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL, *, wait: float = 30, reap: float = 0,
              group: bool = False) -> None:
    """Stop a CLI process and the local Ray it started.

    Sends ``sig`` to ``proc`` (to its whole process group with ``group``, which needs
    ``start_new_session=True``), waits up to ``wait`` s for it, then gives its descendants up to
    ``reap`` s to go (Ray's reaper stops its processes when the driver dies) and SIGKILLs the rest:
    Ray daemons can leave the process group."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
    _, alive = psutil.wait_procs(family, timeout=reap)
    kill_all(alive)


@contextlib.contextmanager
def moto_s3() -> Iterator[dict[str, str]]:
    """A real S3 API on loopback: moto's server (a dev dependency) in its own process. Yields the
    AWS_* variables that point boto3, pyarrow (and so Ray Train) at it, with dummy credentials;
    this process's environment has them while the block runs (restored after)."""
    port = free_port()
    aws = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "lorafleet-test",
           "AWS_SECRET_ACCESS_KEY": "lorafleet-test", "AWS_DEFAULT_REGION": "us-east-1"}
    proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    saved = {k: os.environ.get(k) for k in aws}
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, "moto_server exited at start"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert time.time() < deadline, "moto_server not listening within 60 s"
            time.sleep(0.2)
        os.environ.update(aws)
        yield aws
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stop_tree(proc, signal.SIGTERM, wait=10)


# The MLflow server runs from its own environment (`make venv` builds .venv-mlflow): the full `mlflow`
# package pins pyarrow<26 and cryptography<51, older than what this one holds; lorafleet itself needs
# only the client (the `tracking` extra). LORAFLEET_MLFLOW_SERVER names another `mlflow` executable.
MLFLOW_SERVER = Path(os.environ.get("LORAFLEET_MLFLOW_SERVER", REPO / ".venv-mlflow" / "bin" / "mlflow"))


class MlflowServer:
    """A real `mlflow server` on loopback (sqlite backend, artifacts proxied into a folder), started
    without waiting: a job that logs to it meanwhile starts Ray, and MLflow's client retries until
    the server answers. `client()` waits for it."""

    def __init__(self, root: Path):
        assert MLFLOW_SERVER.is_file(), f"{MLFLOW_SERVER} not found: `make venv` builds .venv-mlflow"
        port = free_port()
        self.uri = f"http://127.0.0.1:{port}"
        self.log = root / "server.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [str(MLFLOW_SERVER), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                 "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                 "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = 180) -> None:
        import urllib.request

        deadline = time.time() + timeout
        while True:
            assert self.proc.poll() is None, f"mlflow server exited:\n{self.log.read_text()[-3000:]}"
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            assert time.time() < deadline, f"mlflow server not up in {timeout} s:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.25)

    def client(self):
        from mlflow import MlflowClient

        self.wait()
        return MlflowClient(tracking_uri=self.uri)

    def stop(self) -> None:
        stop_tree(self.proc, signal.SIGTERM, wait=10, group=True)


def mlflow_children(client, parent_id: str) -> dict[str, object]:
    """The runs nested under `parent_id` (MLflow's parent tag), by run name."""
    exp = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=100)
    return {r.info.run_name: r for r in runs}


class HFEngine:
    """``vllm.LLM.generate``'s shape over transformers(+peft), fp32: greedy token ids, or the next-token
    log-probs of the requested ids. Records every request, so the test sees how many were sent.
    An engine that is transformers itself: a test of what is sent and how answers are read back, without
    starting vLLM (the slow tests run the real engine)."""

    def __init__(self, base, adapters):
        from lorafleet.evaluate import load_for_eval

        self.models = {None: load_for_eval(None, str(base))[0]}
        self.models.update({name: load_for_eval(path, str(base))[0] for name, path in adapters.items()})
        self.requests = []

    def generate(self, prompts, params, lora_request, use_tqdm):
        import torch
        from types import SimpleNamespace as NS

        outs = []
        for prompt, p, lora in zip(prompts, params, lora_request):
            self.requests.append((tuple(prompt["prompt_token_ids"]), p.max_tokens, lora and lora.lora_name))
            model = self.models[lora and lora.lora_name]
            ids = torch.tensor([prompt["prompt_token_ids"]])
            with torch.no_grad():
                if p.logprob_token_ids:
                    logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
                    outs.append(NS(outputs=[NS(token_ids=[], logprobs=[
                        {t: NS(logprob=float(logp[t])) for t in p.logprob_token_ids}])]))
                else:
                    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=p.max_tokens, pad_token_id=0)
                    outs.append(NS(outputs=[NS(token_ids=gen[0, ids.shape[1]:].tolist(), logprobs=None)]))
        return outs
