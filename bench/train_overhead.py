"""Ray Train overhead and LoRA-vs-full costs, measured in one run on this machine.

    .venv/bin/python bench/train_overhead.py [--steps 100] [--batch-size 16] [--warmup 20]
                                             [--model PATH] [--ray-poll-s S] [--json]

Both parts train the classification task (configs/tiny/classification-lora.yaml: synthetic
support tickets, the tiny Llama) with ONE worker, the config's batch size unless overridden, and
eval/checkpoint only at the last step (`train.eval_every=<steps>`).

1. Ray Train overhead: the real lorafleet path, `lorafleet.train.recipe.finetune()` -> TorchTrainer
   running `lorafleet.train.worker.train_loop_per_worker` (Ray Data shard; rank 0 logs every `log_every`
   steps to train_log.jsonl and the driver's progress queue; `ray.train.report` runs only at
   evaluations, here once, at the last step), against a plain PyTorch loop in a fresh process (no Ray in it) that does the
   same step: same model, method, data rows, padding and `collate`, AdamW + LR schedule, grad
   clipping, and the same torch thread count (lorafleet sets `cpus_per_worker` = 1 thread; the
   plain process sets 1 thread and OMP_NUM_THREADS=1 as Ray does for a 1-CPU actor) and the same
   niceness (Ray starts its workers at nice 15; on a machine shared with other work a nice-0 plain
   loop would get more CPU than the Ray worker, which is scheduling priority, not Ray overhead).
   Step times skip the first `--warmup` steps (model/pipeline start-up) and never include eval or
   checkpointing. Two Ray numbers:
   - "lorafleet step_time_s": the value lorafleet reports, i.e. wall time of a `log_every`-step
     window / steps in it, taken from the run's train_log.jsonl; it includes Ray Data batch fetching
     but NOT the logging that closes each window. Median over windows.
   - "all-in (wall)": time between consecutive train_log.jsonl records / `log_every`; it also
     includes the log write and the progress-queue put, i.e. what a user pays per step. Median.
   The plain loop's number is the median over the same `log_every`-step windows of its own
   per-step times (batch fetch + collate + forward + backward + clip + optimizer + scheduler).
   The ratio is Ray / plain; the target is <= 1.10. "report+log per call" is (all-in - step_time_s)
   x log_every: what one log window's closing costs (the train_log.jsonl write and the progress
   queue put; no `ray.train.report` between evaluations). In Ray Train 2.60 (Train V2) a report
   waits while the previous one is still in the worker's size-1 result queue, which the controller
   drains once per RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default): that is why the loop reports
   to Ray only at evaluations. `--ray-poll-s 0.1` sets that interval for this bench's private Ray.
2. LoRA vs full fine-tuning on the same model (the same two runs):
   - trainable / total params: what lorafleet reports (`count_params` after `apply_method`);
   - step time: both numbers above;
   - peak memory: on CPU the process peak RSS (ru_maxrss) - of the Ray Train worker process as
     lorafleet reports it (RunSummary.peak_memory_mb) and of the plain process - plus the exact
     training state (params + grads + AdamW state bytes, counted from the tensors) from the plain
     loop; on GPU torch.cuda.max_memory_allocated instead of RSS. RSS is dominated by the
     interpreter + torch/transformers (and Ray) for a model this small; the state bytes are what
     scales with the model;
   - artifact bytes: what lorafleet would register (RunSummary.artifact_bytes: the adapter, or the
     full model + tokenizer), and the whole Ray checkpoint folder (artifact + optimizer state).

Prints ratios (absolute numbers depend on the machine and its load; the 1-minute load average
before and after is printed too). `--json` prints one JSON document on stdout and nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny" / "classification-lora.yaml"
METHODS = ("lora", "full")
TARGET = 1.10


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------


def _config(args: argparse.Namespace, method: str, work: Path, use_gpu: bool):
    from lorafleet.config import load_config

    overrides = [
        f"model.name_or_path={args.model}",
        f"method.name={method}",
        "scaling.num_workers=1",
        f"scaling.use_gpu={'true' if use_gpu else 'false'}",
        f"train.max_steps={args.steps}",
        f"train.eval_every={args.steps}",  # eval + checkpoint once, at the last step
        "train.eval_samples=16",
        "data.synthetic_sizes.validation=16",  # eval/test scoring is not what is measured here
        "data.synthetic_sizes.test=16",
        f"run.storage_path={work / 'runs'}",
        f"run.name=bench-{method}",
        "register_artifact=false",
    ]
    if args.batch_size:
        overrides.append(f"train.batch_size={args.batch_size}")
    return load_config(CONFIG, overrides)


def _windows(times: list[float], log_every: int, warmup: int) -> list[float]:
    """Mean step time of each full `log_every`-step window that starts after the warm-up."""
    out = []
    for end in range(log_every, len(times) + 1, log_every):
        if end - log_every >= warmup:
            out.append(statistics.fmean(times[end - log_every : end]))
    return out


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _load1() -> float:
    return os.getloadavg()[0]


def _machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    import ray

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "python": platform.python_version(),
    }


class _CpuMeter:
    """CPU seconds used while a phase runs: the whole machine, and each process this bench started
    (its Ray daemons, workers, the plain subprocess), sampled every 0.25 s so that processes which
    exit before the end (the Ray Train worker) still count."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._stop = threading.Event()
        self._start: dict[int, float] = {}
        self._last: dict[int, tuple[str, float]] = {}
        self._sample(first=True)
        self._machine0, self._t0 = psutil.cpu_times(), time.perf_counter()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _sample(self, first: bool = False) -> None:
        me = self._psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                with proc.oneshot():
                    t = proc.cpu_times()
                    name = "bench driver" if proc.pid == me.pid else (proc.cmdline() or [proc.name()])[0].split(" ")[0]
                    name = "plain loop" if "--_plain" in proc.cmdline() else os.path.basename(name)
            except (self._psutil.Error, IndexError):
                continue
            if first:
                self._start[proc.pid] = t.user + t.system
            self._last[proc.pid] = (name, t.user + t.system)

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            self._sample()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        self._sample()
        wall = time.perf_counter() - self._t0
        m0, m1 = self._machine0, self._psutil.cpu_times()
        busy = (sum(m1) - m1.idle - getattr(m1, "iowait", 0)) - (sum(m0) - m0.idle - getattr(m0, "iowait", 0))
        by_name: dict[str, float] = {}
        for pid, (name, cpu) in self._last.items():
            by_name[name] = by_name.get(name, 0.0) + cpu - self._start.get(pid, 0.0)
        return {
            "wall_s": round(wall, 2),
            "machine_busy_cores": round(busy / wall, 2),
            "bench_children_cpu_s": {k: round(v, 2) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])},
        }


# ----------------------------------------------------------------------------------------------
# The plain PyTorch loop (runs in its own process, started with --_plain)
# ----------------------------------------------------------------------------------------------


def _plain(spec: dict[str, Any]) -> dict[str, Any]:
    """The lorafleet training step without Ray: same model, method, rows, collate and optimizer."""
    import numpy as np
    import psutil
    import torch

    from lorafleet.base_model import load_model, load_tokenizer
    from lorafleet.config import FinetuneConfig
    from lorafleet.data import IGNORE_INDEX
    from lorafleet.train.context import RunContext
    from lorafleet.train.dataset import build_scheduler, collate  # the exact collate and LR schedule of the Ray loop
    from lorafleet.train.methods import apply_method, count_params

    cfg = FinetuneConfig.model_validate(spec["config"])
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))  # what train_loop_per_worker sets
    torch.manual_seed(cfg.train.seed)
    device = torch.device("cuda" if cfg.scaling.use_gpu else "cpu")

    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    encoded = RunContext.build(cfg).encode(tokenizer)
    # The padding of lorafleet.train.dataset.build_dataset, as numpy columns instead of a Ray Dataset.
    width = max(len(r["input_ids"]) for r in encoded)
    label_width = max(len(r["labels"]) for r in encoded)
    pad = tokenizer.pad_token_id
    columns = {
        "input_ids": np.array([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in encoded], dtype=np.int64),
        "attention_mask": np.array(
            [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in encoded], dtype=np.int64
        ),
        "labels": np.array(
            [r["labels"] + [IGNORE_INDEX] * (label_width - len(r["labels"])) for r in encoded], dtype=np.int64
        ),
    }

    base = load_model(cfg.model.name_or_path, cfg.model.dtype, cfg.model.trust_remote_code)
    model = apply_method(base, cfg.method, num_labels=None).to(device)
    trainable, total = count_params(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = build_scheduler(optimizer, cfg)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if cfg.scaling.use_gpu else torch.autocast("cpu", enabled=False)
    )
    rss_before_mb = psutil.Process().memory_info().rss / 2**20
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    bs, rng = cfg.train.batch_size, np.random.default_rng(cfg.train.seed)

    def batches():
        while True:  # epochs; drop_last like iter_torch_batches(drop_last=True)
            order = rng.permutation(len(encoded))
            for i in range(0, len(order) - bs + 1, bs):
                yield collate({k: v[order[i : i + bs]] for k, v in columns.items()})

    it = batches()
    times, tokens = [], []
    model.train()
    for step in range(spec["steps"]):
        start = time.perf_counter()
        n_tokens = 0
        for _ in range(cfg.train.grad_accum):
            batch = next(it)
            input_ids = batch["input_ids"].to(device)
            mask = batch["attention_mask"].to(device)
            with autocast:
                loss = model(input_ids=input_ids, attention_mask=mask, labels=batch["labels"].to(device)).loss
            (loss / cfg.train.grad_accum).backward()
            n_tokens += int(mask.sum())
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % cfg.train.log_every == 0:
            float(loss.detach())  # the Ray loop reads the loss at each log step
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        tokens.append(n_tokens)

    # Exact training state: weights + grads (set_to_none: none between steps, so count one set for
    # the trainable params as they exist during backward) + AdamW's exp_avg/exp_avg_sq (+ step).
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    opt_bytes = sum(
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )
    peak_mb = (
        torch.cuda.max_memory_allocated(device) / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    )
    warm = spec["warmup"]
    return {
        "threads": torch.get_num_threads(),
        "niceness": os.nice(0),
        "trainable_params": trainable,
        "total_params": total,
        "step_time_s": statistics.median(_windows(times, cfg.train.log_every, warm)),
        "step_time_median_single_s": statistics.median(times[warm:]),
        "windows_s": _windows(times, cfg.train.log_every, warm),
        "tokens_per_step": statistics.fmean(tokens[warm:]),
        "peak_memory_mb": round(peak_mb, 1),
        "rss_before_train_mb": round(rss_before_mb, 1),
        "train_state_mb": round((weight_bytes + grad_bytes + opt_bytes) / 2**20, 2),
    }


def _ray_worker_niceness() -> int:
    """The niceness Ray gives its worker processes (RAY_worker_niceness, 15 by default)."""
    import ray

    return ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote())


def _run_plain(cfg, args: argparse.Namespace, niceness: int) -> dict[str, Any]:
    """Run the plain loop in a fresh process: its own peak RSS, no Ray inside it, and the Ray
    worker's niceness, so that other load on the machine slows both sides alike."""
    threads = str(max(1, int(cfg.scaling.cpus_per_worker)))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    spec = {"config": cfg.model_dump(mode="json"), "steps": args.steps, "warmup": args.warmup}
    bump = max(0, niceness - os.nice(0))
    proc = subprocess.run(
        [sys.executable, __file__, "--_plain", json.dumps(spec)], env=env, capture_output=True, text=True,
        preexec_fn=(lambda: os.nice(bump)) if bump else None,
    )
    if proc.returncode:
        raise RuntimeError(f"plain loop failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# The lorafleet Ray Train path
# ----------------------------------------------------------------------------------------------


def _run_ray(cfg, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """lorafleet.train.recipe.finetune() with one worker; step times from the run's train_log.jsonl."""
    from lorafleet.train.recipe import finetune

    summary = finetune(cfg, registry_root=work / "registry", progress=False)
    run_dir = Path(summary.run_dir)
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
    every = cfg.train.log_every
    reported, wall = [], []
    for prev, rec in zip([None] + records[:-1], records):
        if rec["step"] % every or rec["step"] - every < args.warmup:
            continue  # a partial window, or one that overlaps the warm-up
        reported.append(rec["step_time_s"])
        if prev is not None and rec["step"] - prev["step"] == every:
            wall.append((rec["time"] - prev["time"]) / every)
    checkpoints = sorted(d for d in run_dir.glob("checkpoint_*") if d.is_dir())  # not *_snapshot.json
    artifact = Path(summary.artifact_dir)
    out = {
        "path": "lorafleet.train.recipe.finetune -> TorchTrainer(lorafleet.train.worker.train_loop_per_worker)",
        "trainable_params": summary.trainable_params,
        "total_params": summary.total_params,
        "step_time_s": statistics.median(reported),
        "step_time_wall_s": statistics.median(wall),
        "windows_s": reported,
        "windows_wall_s": wall,
        "tokens_per_step": statistics.fmean(
            r["tokens_per_s"] * r["step_time_s"] for r in records if r["step"] % every == 0 and r["step"] - every >= args.warmup
        ),
        "peak_memory_mb": summary.peak_memory_mb,
        "artifact_bytes": summary.artifact_bytes,
        "artifact_weights_bytes": sum(f.stat().st_size for f in artifact.rglob("*.safetensors")),
        "checkpoint_dir_bytes": _dir_bytes(checkpoints[-1]) if checkpoints else 0,
        "wall_time_s": summary.wall_time_s,
        "test_metrics": summary.test_metrics,
    }
    shutil.rmtree(artifact.parent, ignore_errors=True)  # finetune() copies the artifact to a temp dir
    return out


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _print(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    m = result["machine"]
    console = Console(width=None if sys.stdout.isatty() else 150)  # files/pipes: no 80-column wrap
    console.print(
        f"[bold]lorafleet train overhead[/] {result['date']}\n{m['cpu']}, {m['cores']} cores  |  "
        f"GPU: {m['gpu'] or 'none'}  |  torch {m['torch']}, ray {m['ray']}, python {m['python']}"
    )
    a = result["args"]
    console.print(
        f"model {a['model']}  |  batch {a['batch_size']}  |  {a['steps']} steps, first {a['warmup']} "
        f"skipped, medians over {a['log_every']}-step windows\ntorch threads: plain "
        f"{result['methods']['lora']['plain']['threads']}, Ray worker {a['worker_threads']} "
        f"(cpus_per_worker)  |  niceness: plain {result['methods']['lora']['plain']['niceness']}, "
        f"Ray worker {a['niceness']}  |  load avg 1 min: {result['load_before']:.2f} before, "
        f"{result['load_after']:.2f} after"
    )

    t = Table(title=f"1. Ray Train (1 worker, lorafleet path) vs plain PyTorch loop; target ratio <= {TARGET:.2f}")
    for col in ("method", "plain", "Ray: lorafleet step_time_s", "ratio", "Ray: all-in (wall)", "ratio",
                "report+log per call", "tokens/step plain | Ray"):
        t.add_column(col, justify="right" if col != "method" else "left")
    for method, r in result["methods"].items():
        p, ry = r["plain"], r["ray"]
        ok = lambda x: f"[green]{x:.3f}[/]" if x <= TARGET else f"[red]{x:.3f}[/]"  # noqa: E731
        t.add_row(
            method,
            f"{p['step_time_s'] * 1e3:.1f} ms",
            f"{ry['step_time_s'] * 1e3:.1f} ms",
            ok(r["ratio"]),
            f"{ry['step_time_wall_s'] * 1e3:.1f} ms",
            ok(r["ratio_wall"]),
            f"{r['report_s_per_call'] * 1e3:.0f} ms / {a['log_every']} steps",
            f"{p['tokens_per_step']:.0f} | {ry['tokens_per_step']:.0f}",
        )
    console.print(t)
    for method, r in result["methods"].items():
        pc, rc = r["plain"]["cpu"], r["ray"]["cpu"]
        procs = rc["bench_children_cpu_s"]
        worker = sum(v for k, v in procs.items() if "RayTrainWorker" in k)
        driver = procs.get("bench driver", 0.0)
        others = {k: v for k, v in procs.items() if "RayTrainWorker" not in k and k != "bench driver"}
        top = ", ".join(f"{k.removeprefix('ray::')} {v:.1f}" for k, v in list(others.items())[:4])
        console.print(
            f"  {method}: machine CPU busy {pc['machine_busy_cores']:.2f} of {m['cores']} cores during the plain "
            f"loop, {rc['machine_busy_cores']:.2f} during the Ray run ({rc['wall_s']:.0f} s, start-up included): "
            f"train worker {worker:.1f} CPU-s, bench driver {driver:.1f}, Ray's other processes "
            f"{sum(others.values()):.1f} ({top} ...)"
        )

    lo, fu = result["methods"]["lora"], result["methods"]["full"]
    mem = "peak alloc" if m["gpu"] else "peak RSS"
    t2 = Table(title="2. LoRA vs full fine-tuning (same model, data, batch; one worker)")
    for col in ("measure", "lora", "full", "lora / full"):
        t2.add_column(col, justify="right" if col != "measure" else "left")

    def row(name, key_lo, key_fu, fmt, ratio=True):
        ratio_s = f"{key_lo / key_fu:.3f}" if ratio and key_fu else ""
        t2.add_row(name, fmt(key_lo), fmt(key_fu), ratio_s)

    row("trainable params", lo["ray"]["trainable_params"], fu["ray"]["trainable_params"], lambda x: f"{x:,}")
    row("total params", lo["ray"]["total_params"], fu["ray"]["total_params"], lambda x: f"{x:,}")
    ms = lambda x: f"{x * 1e3:.1f} ms"  # noqa: E731
    row("step time, Ray (lorafleet step_time_s)", lo["ray"]["step_time_s"], fu["ray"]["step_time_s"], ms)
    row("step time, Ray all-in (wall)", lo["ray"]["step_time_wall_s"], fu["ray"]["step_time_wall_s"], ms)
    row("step time, plain loop", lo["plain"]["step_time_s"], fu["plain"]["step_time_s"], ms)
    mib = lambda x: f"{x:.1f} MiB"  # noqa: E731
    row(f"{mem}, Ray worker (RunSummary)", lo["ray"]["peak_memory_mb"], fu["ray"]["peak_memory_mb"], mib)
    row(f"{mem}, plain process", lo["plain"]["peak_memory_mb"], fu["plain"]["peak_memory_mb"], mib)
    row("training state (weights+grads+AdamW)", lo["plain"]["train_state_mb"], fu["plain"]["train_state_mb"],
        lambda x: f"{x:.2f} MiB")
    row("artifact on disk (registered)", lo["ray"]["artifact_bytes"], fu["ray"]["artifact_bytes"], _mb)
    row("  of which weights (*.safetensors)", lo["ray"]["artifact_weights_bytes"],
        fu["ray"]["artifact_weights_bytes"], _mb)
    row("Ray checkpoint dir (+ optimizer state)", lo["ray"]["checkpoint_dir_bytes"],
        fu["ray"]["checkpoint_dir_bytes"], _mb)
    row("run wall time (finetune(), incl. start-up)", lo["ray"]["wall_time_s"], fu["ray"]["wall_time_s"],
        lambda x: f"{x:.1f} s")
    console.print(t2)
    console.print(f"Ray number from: {result['methods']['lora']['ray']['path']}; "
                  f"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S={a['ray_train_health_check_interval_s']}; "
                  f"bench wall time {result['bench_wall_s']:.0f} s")


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main() -> None:
    from lorafleet.config import default_home

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run (default 100)")
    parser.add_argument("--warmup", type=int, default=20, help="steps skipped before timing (default 20)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's (16)")
    parser.add_argument("--model", default=str(default_home() / "models" / "tiny"),
                        help="base model folder (default: $LORAFLEET_HOME/models/tiny or ./.lorafleet/...)")
    parser.add_argument("--ray-poll-s", type=float, default=None,
                        help="set RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray Train's controller poll: Ray's default 2 s, "
                        "lorafleet's local default 0.2 s) for this bench's private Ray; default: lorafleet's")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout, nothing else")
    parser.add_argument("--_plain", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._plain:
        print(json.dumps(_plain(json.loads(args._plain))))
        return

    if args.ray_poll_s is not None:  # read by the Train controller actor, which inherits the raylet's env
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(args.ray_poll_s)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.model = str(Path(args.model).resolve())
    if not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there; build the tiny model with `make base`")

    real_stdout = None
    if args.json:  # Ray and the progress output go to stderr; stdout gets only the JSON document
        sys.stdout.flush()
        real_stdout = os.dup(1)
        os.dup2(2, 1)

    import torch

    from lorafleet.cluster import init_ray

    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="lf-bench-train-"))
    use_gpu = torch.cuda.is_available()
    cfgs = {m: _config(args, m, work, use_gpu) for m in METHODS}
    log_every = cfgs["lora"].train.log_every
    if args.warmup % log_every:
        args.warmup += log_every - args.warmup % log_every  # whole windows only
    if args.steps < args.warmup + 2 * log_every:
        parser.error(f"--steps {args.steps} leaves under 2 timed windows of {log_every} steps after "
                     f"--warmup {args.warmup}; use --steps >= {args.warmup + 2 * log_every}")
    load_before = _load1()
    try:
        init_ray()
        niceness = _ray_worker_niceness()
        methods: dict[str, Any] = {}
        for method in METHODS:  # plain then Ray, back to back, so machine load drifts least between them
            meter = _CpuMeter()
            plain = _run_plain(cfgs[method], args, niceness)
            plain["cpu"] = meter.stop()
            meter = _CpuMeter()
            ray_ = _run_ray(cfgs[method], args, work)
            ray_["cpu"] = meter.stop()
            methods[method] = {
                "plain": plain,
                "ray": ray_,
                "ratio": ray_["step_time_s"] / plain["step_time_s"],
                "ratio_wall": ray_["step_time_wall_s"] / plain["step_time_s"],
                # Outside lorafleet's step_time_s window: the log write + progress-queue put (Ray
                # gets a report only at evaluations, i.e. once here, at the last step).
                "report_s_per_call": (ray_["step_time_wall_s"] - ray_["step_time_s"]) * log_every,
            }
        load_after = _load1()
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    from lorafleet.cluster import LOCAL_TRAIN_POLL_S

    result = {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": _machine(),
        "args": {
            "steps": args.steps,
            "warmup": args.warmup,
            "batch_size": cfgs["lora"].train.batch_size,
            "log_every": log_every,
            "model": args.model,
            "worker_threads": max(1, int(cfgs["lora"].scaling.cpus_per_worker)),
            "niceness": niceness,
            "ray_train_health_check_interval_s": os.environ.get(
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", f"{LOCAL_TRAIN_POLL_S} (lorafleet.cluster.init_ray's local default)"),
        },
        "load_before": load_before,
        "load_after": load_after,
        "target_ratio": TARGET,
        "methods": methods,
        "bench_wall_s": round(time.time() - started, 1),
    }
    if real_stdout is not None:
        sys.stdout.flush()
        os.dup2(real_stdout, 1)
        print(json.dumps(result, indent=2))
    else:
        _print(result)


if __name__ == "__main__":
    main()
