"""A real two-node Ray cluster on this machine (`ray start --head` + `ray start --address`, one CPU
each): `ray job submit` runs jobs/finetune.py and each training worker lands on its own node.

Nodes are stopped by PID, never with `ray stop` (that would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time

import pytest

from helpers import REPO, VENV_BIN, free_port, kill_all, processes_mentioning

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _ray(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "ray"), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def two_node_cluster(home):
    # Ray's socket paths live under the temp dir and must stay under 107 bytes: pytest's
    # tmp_path is too deep, so use a short folder straight under /tmp.
    temp_dir = tempfile.mkdtemp(prefix="rf-", dir="/tmp")
    gcs, dash = free_port(), free_port()
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    # Ray turns token authentication on by default; every CLI call must then say so.
    env.update(RAY_AUTH_MODE="token", PATH=f"{VENV_BIN}:{env['PATH']}", LORAFLEET_HOME=str(home))
    # Each node's dashboard agent serves HTTP on a fixed port (52365) unless told otherwise. When
    # another Ray on this machine (the other pytest worker's, a `lorafleet serve`) holds it, the head's
    # agent starts without HTTP, never registers, and the job API answers "No available agent" for
    # ever (Ray's dashboard/agent.py): CI failed that way for 300 s. Free ports for both agents.
    head = _ray(["start", "--head", "--num-cpus=1", f"--port={gcs}", f"--dashboard-port={dash}",
                 "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}", "--include-dashboard=true",
                 f"--dashboard-agent-listen-port={free_port()}"], env)
    assert head.returncode == 0, head.stderr[-3000:]
    try:
        worker = _ray(["start", f"--address=127.0.0.1:{gcs}", "--num-cpus=1",
                       f"--dashboard-agent-listen-port={free_port()}"], env)
        assert worker.returncode == 0, worker.stderr[-3000:]
        yield {"env": env, "dashboard": f"http://127.0.0.1:{dash}", "gcs": f"127.0.0.1:{gcs}"}
    finally:
        kill_all(processes_mentioning(temp_dir))
        # Processes started without the temp dir on their command line (the second raylet's
        # helpers) are found through the session folder they hold open.
        time.sleep(1)
        kill_all(processes_mentioning(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_submit_two_nodes_one_worker_each(two_node_cluster, home):
    env = two_node_cluster["env"]
    nodes = _ray(["list", "nodes", "--address", two_node_cluster["gcs"], "--format", "json"], env)
    submit = ["job", "submit", "--address", two_node_cluster["dashboard"], "--working-dir", ".",
              "--runtime-env-json", json.dumps({"env_vars": {"LORAFLEET_HOME": str(home), "TOKENIZERS_PARALLELISM": "false"}}),
              "--", "python", "jobs/finetune.py", "--config", "configs/tiny/classification-lora.yaml",
              "--set", "name=two-node", "--set", "scaling.num_workers=2", "--set", "train.max_steps=30",
              "--set", "train.eval_every=30", "--set", "train.eval_samples=8",
              "--set", "data.synthetic_sizes={train: 200, validation: 8, test: 16}"]
    # On a loaded machine the head's job agent can come up seconds after `ray start` returns;
    # the dashboard then answers 500 "No available agent ... try again later", before any job
    # is created. Retrying exactly that answer is what Ray asks for; any other failure counts.
    deadline = time.monotonic() + 120
    while True:
        job = _ray(submit, env, timeout=900)
        if "No available agent" not in job.stderr or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-3000:]
    assert "succeeded" in (job.stdout + job.stderr).lower()
    summary = json.loads([line for line in job.stdout.splitlines() if line.startswith('{"run_name"')][-1])
    assert summary["steps"] == 30 and summary["registered"] == "two-node@1"
    assert len(summary["worker_nodes"]) == 2
    assert len(set(summary["worker_nodes"])) == 2, "both training workers ran on the same node"
    if nodes.returncode == 0 and nodes.stdout.strip().startswith("["):
        alive = {n["node_id"] for n in json.loads(nodes.stdout) if n.get("state") == "ALIVE"}
        assert set(summary["worker_nodes"]) <= alive
