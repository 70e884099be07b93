"""A sweep's table (printed at the end, saved as table.txt) and its figure (sweep.png).

The parameter columns are the sweep's searched keys (`SweepReport.space`), whatever method they
belong to; only keys computed from another (`tied_to`, `SweepReport.tied`) are left out of the
one-line summary of the winner and of the scatter's axes. Everything shown comes from the report
passed in (a `lorafleet.sweep.SweepReport`, typed `Any` here as in the other report modules: each
trial's params, metric history and training-loss curve); nothing here reads the sweep folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["build_table", "print_table", "plot"]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2e}" if (value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4)) else f"{value:.4g}"
    return str(value)


def _is_lr(key: str) -> bool:
    return key.split(".")[-1] == "lr"


def _cell(key: str, value: Any) -> str:
    """A parameter's table cell: learning rates always in scientific notation, so they line up."""
    return f"{value:.2e}" if _is_lr(key) and isinstance(value, (int, float)) else _fmt(value)


def _short(keys: list[str]) -> dict[str, str]:
    """Column names: the last dotted part (`method.lora.r` -> `r`), the whole key where two clash."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def build_table(report: Any):
    """The rich table printed at the end of a sweep: best first, one column per searched key."""
    from rich.table import Table

    title = f"sweep {Path(report.sweep_dir).name}: {len(report.trials)} trials, ranked by {report.metric} ({report.mode})"
    table = Table(title=title)
    names = _short(report.space)
    for col in ["#", "trial", *names.values(), report.metric, "best@step", "trainable", "steps", "wall s", "ASHA stop"]:
        table.add_column(col, justify="right" if col not in ("trial", "ASHA stop") else "left")
    for t in report.trials:
        value = t["best_" + report.metric]
        stopped = {"asha": f"yes @{t['steps']}", "stopped": f"budget @{t['steps']}", "error": "error"}.get(t["status"], "no")
        table.add_row(
            str(t["rank"]), t["trial_id"], *[_cell(k, t["params"].get(k, "-")) for k in report.space],
            f"{value:.4f}" if value is not None else "-", str(t["best_step"] or "-"),
            f"{t['trainable_params']:,}", str(t["steps"]), f"{t['wall_time_s']:.0f}", stopped,
        )
    return table


def _footer(report: Any) -> str:
    lines = [f"sweep wall time {report.wall_time_s:.0f} s; folder {report.sweep_dir}"]
    if report.best:
        b = report.best
        test = ", ".join(f"{k}={v:.4f}" for k, v in b["test_metrics"].items())
        names = _short(report.space)
        params = ", ".join(f"{names[k]}={_fmt(b['params'].get(k, '-'))}" for k in report.space if k not in report.tied)
        lines.append(f"best: {b['trial_id']} ({params}) {report.metric}={b[report.metric]:.4f} "
                     f"at step {b['step']}; test {test}")
    if report.registered:
        lines.append(f"registered {report.registered}" + (" (promoted: live)" if report.promoted else ""))
    return "\n".join(lines)


def print_table(report: Any, console=None) -> str:
    """Print the table and footer; return them as plain text (what table.txt holds)."""
    from rich.console import Console

    # Piped output (CI logs, `| tee`) defaults to 80 columns, which squeezes the table unreadably.
    console = console or Console(width=None if Console().is_terminal else 160)
    console.print(build_table(report))
    console.print(_footer(report))
    recorder = Console(record=True, width=160, file=open(os.devnull, "w"))
    recorder.print(build_table(report))
    recorder.print(_footer(report))
    return recorder.export_text()


def _axes(report: Any) -> tuple[str | None, str | None]:
    """The scatter's (x, y) keys: two sampled numeric keys, a learning rate on x when searched."""
    numeric = [k for k in report.space if k not in report.tied and report.trials
               and all(isinstance(t["params"].get(k), (int, float)) for t in report.trials)]
    x = next((k for k in numeric if _is_lr(k)), numeric[1] if len(numeric) > 1 else None)
    y = next((k for k in numeric if k != x), None)
    return x, y


def _label(key: str | None) -> str:
    return {"method.lora.r": "LoRA rank r", "train.lr": "learning rate"}.get(key or "", key or "")


def _scatter(ax, fig, report: Any) -> None:
    """Each trial at its two sampled values, coloured by its best metric; the winner ringed in red."""
    metric = report.metric
    x, y = _axes(report)
    scored = [t for t in report.trials if t["best_" + metric] is not None]
    xs = [t["params"][x] for t in scored] if x else [t["rank"] for t in scored]
    ys = [t["params"][y] for t in scored] if y else [t["best_" + metric] for t in scored]
    sc = ax.scatter(xs, ys, c=[t["best_" + metric] for t in scored], cmap="viridis", s=160,
                    edgecolors=["red" if t["rank"] == 1 else "black" for t in scored],
                    linewidths=[2.5 if t["rank"] == 1 else 0.8 for t in scored])
    for t, xv, yv in zip(scored, xs, ys):
        ax.annotate(f"#{t['rank']}", (xv, yv), textcoords="offset points", xytext=(8, 6), fontsize=8)
    names = {"method.lora.r": "rank", "train.lr": "learning rate"}
    title = f"{names.get(y, _label(y) or metric)} x {names.get(x, _label(x) or 'rank')}"
    ax.set(title=f"{title} (colour: best {metric})", xlabel=_label(x) or "rank", ylabel=_label(y) or metric)
    if x and all(v > 0 for v in xs):
        ax.set_xscale("log")
    if y and all(v > 0 for v in ys):
        ax.set_yscale("log")
        if all(isinstance(v, int) for v in ys):
            ticks = sorted(set(ys))
            ax.set_yticks(ticks, [str(v) for v in ticks])
            ax.minorticks_off()
    fig.colorbar(sc, ax=ax, label=metric)


def plot(report: Any, out: Path) -> Path:
    """Learning curves of every trial (validation metric, training loss) and a scatter of two searched keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_val, ax_loss, ax_sc) = plt.subplots(1, 3, figsize=(17, 5))
    cmap = plt.get_cmap("tab10")
    metric = report.metric
    shown = [k for k in report.space if k not in report.tied]
    names = _short(report.space)
    for i, t in enumerate(sorted(report.trials, key=lambda t: t["trial_id"])):
        color = cmap(i % 10)
        style = "--" if t["stopped_early"] else "-"
        width = 3 if t["rank"] == 1 else 1.5
        params = " ".join(f"{names[k]}={_cell(k, t['params'].get(k, '-'))}" for k in shown)
        label = f"#{t['rank']} {params}" + (" (ASHA)" if t["status"] == "asha" else "")
        evals = [h for h in t["history"] if metric in h]
        ax_val.plot([h["step"] for h in evals], [h[metric] for h in evals], style, marker="o", color=color,
                    lw=width, label=label)
        if t.get("train_loss"):  # [[step, loss], ...]
            steps, losses = zip(*t["train_loss"])
            ax_loss.plot(steps, losses, style, color=color, lw=width, label=label)
    ax_val.set(title=f"validation {metric.removeprefix('val_')} (dashed: stopped early)", xlabel="step", ylabel=metric)
    ax_val.legend(fontsize=7)
    ax_loss.set(title="training loss (rank 0)", xlabel="step", ylabel="loss", yscale="log")
    _scatter(ax_sc, fig, report)
    fig.suptitle(f"sweep {Path(report.sweep_dir).name}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
