"""Tables of training runs, of the artifact registry and of the demo, as the CLI and `make demo` print them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

__all__ = ["print_summary", "print_registry", "demo_table"]


def _console():
    from rich.console import Console

    return Console()


def print_summary(summary: Any) -> None:
    """The final table of a training run (a `lorafleet.train.results.RunSummary`)."""
    from rich.table import Table

    table = Table(title=f"run {summary.run_name}")
    table.add_column("field")
    table.add_column("value")
    table.add_row("task / method", f"{summary.task} / {summary.method}")
    for k, v in summary.test_metrics.items():
        table.add_row(f"test {k}", f"{v:.4f}")
    pct = 100 * summary.trainable_params / max(1, summary.total_params)
    table.add_row("trainable params", f"{summary.trainable_params:,} of {summary.total_params:,} ({pct:.2f}%)")
    table.add_row("steps", str(summary.steps))
    table.add_row("wall time", f"{summary.wall_time_s:.1f} s")
    table.add_row("run folder", summary.run_dir)
    table.add_row("registered", summary.registered or "-")
    _console().print(table)


def print_registry(root: Path, entries: Iterable[Any]) -> None:
    """One row per registry entry: name, version, aliases, task, method, first test metric, size."""
    from rich.table import Table

    table = Table(title=f"registry {root}")
    for col in ("name", "version", "aliases", "task", "method", "test metric", "trainable", "created"):
        table.add_column(col)
    for e in entries:
        m = e.meta
        first = next(iter(m.test_metrics.items()), None)
        table.add_row(e.name, e.version, ",".join(e.aliases), m.task or "", m.method or "",
                      f"{first[0]}={first[1]:.3f}" if first else "-", f"{m.trainable_params or 0:,}",
                      (m.created or "")[:19])
    _console().print(table)


def demo_table(rows: list[dict[str, Any]]) -> Any:
    """The demo's table (a rich Table): untuned base model vs LoRA adapter, one row per task."""
    from rich.table import Table

    table = Table(title="untuned base model vs LoRA adapter (test split)")
    for col in ("task", "metric", "base", "adapter", "trainable", "steps", "train time", "registered"):
        table.add_column(col, justify="right" if col in ("base", "adapter", "trainable", "steps", "train time") else "left")
    for r in rows:
        table.add_row(r["task"], r["metric"], f"{r['base']:.4f}", f"{r['adapter']:.4f}", f"{r['trainable_pct']:.2f}%",
                      str(r["steps"]), f"{r['wall_time_s']:.0f} s", r["registered"] or "-")
    return table
