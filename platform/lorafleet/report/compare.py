"""The method ladder's report (a markdown table, a PNG chart and the rows as JSON) and the prompt
lab's table.

Everything here formats numbers a run measured (`lorafleet.compare.RungResult`); nothing is
computed that the run did not record, except ratios of recorded numbers.
"""

from __future__ import annotations

import json
import math
import os
import platform as _stdlib_platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["markdown_table", "ladder_chart", "write_report", "load_rows", "prompt_table", "REPORT_FILES"]

REPORT_FILES = {"json": "ladder.json", "markdown": "report.md", "chart": "ladder.png"}


def _bytes(n: int) -> str:
    if n <= 0:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _params(n: int) -> str:
    if n <= 0:
        return "0"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _row(r: Any) -> dict[str, Any]:
    return r if isinstance(r, dict) else r.as_dict()


def markdown_table(rows: list[Any], currency: str = "USD") -> str:
    """The ladder as a GitHub markdown table, in run order, with each rung's rank by the metric."""
    rows = [_row(r) for r in rows]
    if not rows:
        return "_no rungs_\n"
    metric = rows[0]["metric"]
    head = ["rank", "rung", f"test {metric}", "trainable params", "% of model", "wall time",
            "peak memory", "checkpoint", "tokens/s", f"cost ({currency})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---:", ":---"] + ["---:"] * (len(head) - 2)) + "|"]
    for r in rows:
        pct = 100 * r["trainable_params"] / r["total_params"] if r["total_params"] else 0.0
        lines.append("| " + " | ".join([
            str(r["rank"]), r["rung"], f"{r['value']:.3f}" if r.get("status", "ok") == "ok" else "failed",
            _params(r["trainable_params"]),
            f"{pct:.2f}%" if r["trainable_params"] else "0%", f"{r['wall_time_s']:.1f} s",
            f"{r['peak_memory_mb']:,.0f} MB", _bytes(r["artifact_bytes"]), f"{r['tokens_per_s']:,.0f}",
            f"{r['cost']:.5f}",
        ]) + " |")
    return "\n".join(lines) + "\n"


def ladder_chart(rows: list[Any], path: str | Path, title: str = "method ladder", currency: str = "USD") -> Path:
    """Two panels: test metric vs cost, and trainable parameters per rung on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in map(_row, rows) if r.get("status", "ok") == "ok"]  # a failed rung has nothing to draw
    metric = rows[0]["metric"] if rows else "metric"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"prompt": "tab:gray", "train": "tab:blue"}
    for i, r in enumerate(rows):
        color = "tab:orange" if r["rung"] == "lora" else colors.get(r["kind"], "tab:blue")
        ax1.scatter(r["cost"], r["value"], s=60, color=color, zorder=3)
        # Alternate label offsets: neighbouring rungs often land on the same spot (e.g. both prompts).
        ax1.annotate(r["rung"], (r["cost"], r["value"]), textcoords="offset points",
                     xytext=(5, 5 if i % 2 == 0 else -13), fontsize=9)
    ax1.set_xlabel(f"cost ({currency}) = wall time x devices x price per device-hour")
    ax1.set_ylabel(f"test {metric}")
    ax1.set_title(f"{metric} vs cost")
    ax1.grid(alpha=0.3)

    names = [r["rung"] for r in rows]
    values = [max(r["trainable_params"], 0) for r in rows]
    y = list(range(len(rows)))
    positive = [v for v in values if v > 0]
    floor = 10 ** math.floor(math.log10(min(positive))) / 10 if positive else 1
    ax2.barh(y, [v if v > 0 else 0 for v in values], left=floor,
             color=["tab:orange" if n == "lora" else "tab:gray" if v == 0 else "tab:blue" for n, v in zip(names, values)])
    ax2.set_xscale("log")
    ax2.set_yticks(y, names)
    ax2.invert_yaxis()
    for i, v in enumerate(values):
        ax2.text(floor * 1.2 if v == 0 else v + floor, i, " 0 (prompting)" if v == 0 else f" {_params(v)}",
                 va="center", fontsize=8)
    ax2.set_xlabel("trainable parameters (log scale)")
    ax2.set_title("trainable parameters")
    ax2.grid(alpha=0.3, axis="x")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(rows: list[Any], out_dir: str | Path, ladder: Any | None = None) -> dict[str, Path]:
    """Write ladder.json (the rows + context), report.md (table + notes) and ladder.png into `out_dir`."""
    out_dir = Path(out_dir)
    dicts = [_row(r) for r in rows]
    currency = ladder.config.currency if ladder else "USD"
    price = ladder.config.price_per_device_hour if ladder else 0.0
    first = next(iter(ladder.rungs.values())) if ladder else None
    context = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{_stdlib_platform.machine()} {_stdlib_platform.system()}, python {_stdlib_platform.python_version()}",
        "cpus": os.cpu_count(),
        "base_model": first.model.name_or_path if first else None,
        "task": first.task.name if first else None,
        "price_per_device_hour": price,
        "currency": currency,
        "source": ladder.source if ladder else None,
    }
    paths = {k: out_dir / v for k, v in REPORT_FILES.items()}
    paths["json"].write_text(json.dumps({"context": context, "rows": dicts}, indent=2))
    ladder_chart(dicts, paths["chart"], title=f"{context['task']} ladder on {Path(str(context['base_model'])).name}",
                 currency=currency)
    notes = [f"- **{r['rung']}**: {r['notes']}" for r in dicts if r.get("notes")]
    by_rung = {r["rung"]: r for r in dicts}
    if "lora" in by_rung and "full" in by_rung and by_rung["lora"]["value"] is not None and by_rung["full"]["value"] is not None:
        lo, fu = by_rung["lora"], by_rung["full"]
        notes.append(
            f"- LoRA vs full: {lo['metric']} {lo['value']:.3f} vs {fu['value']:.3f} "
            f"(difference {lo['value'] - fu['value']:+.3f}); trainable parameters "
            f"{lo['trainable_params'] / max(1, fu['trainable_params']):.2%} of full; checkpoint "
            f"{lo['artifact_bytes'] / max(1, fu['artifact_bytes']):.2%} of full."
        )
    md = [
        f"# Method ladder: {context['task']} on `{context['base_model']}`",
        "",
        f"{context['created']} on {context['machine']}, {context['cpus']} CPUs. Price {price:g} {currency} per "
        "device-hour (a device is a GPU, or a CPU worker on CPU clusters). Rank is by the test metric "
        "(ties: fewer trainable parameters first).",
        "",
        markdown_table(dicts, currency),
        "Wall time is the whole rung: for training rungs data loading, Ray start-up, training and the "
        "test evaluation; for prompting rungs model loading and scoring the test split. Peak memory is "
        "process RSS on CPU (rank 0 for training) or max allocated on GPU. tokens/s is training "
        "throughput for training rungs and tokens processed while scoring for prompting rungs.",
        "",
        *notes,
        "",
        f"![ladder]({REPORT_FILES['chart']})",
        "",
    ]
    paths["markdown"].write_text("\n".join(md))
    return paths


def load_rows(out_dir: str | Path) -> list[dict[str, Any]]:
    """The rows a ladder wrote (ladder.json)."""
    return json.loads((Path(out_dir) / REPORT_FILES["json"]).read_text())["rows"]


def prompt_table(results: list[dict[str, Any]]) -> str:
    """The prompt lab's results as a markdown table."""
    if not results:
        return "_no templates_\n"
    metric = results[0]["metric"]
    lines = [f"| template | k | shots used | test {metric} | rows | prompt tokens | seconds | tokens/s |",
             "|:---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['template']} | {r['k']} | {r['shots_used_mean']:.1f} | {r['value']:.3f} | {r['rows']} | "
                     f"{r['prompt_tokens_mean']:.0f} | {r['seconds']:.1f} | {r['tokens_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"
