"""`lorafleet compare` (the method ladder) and `lorafleet prompts` (the prompt lab)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lorafleet.cli._args import add_cluster, add_output, add_overrides, cluster_from_args

__all__ = ["add_parser", "cmd_compare", "cmd_prompts"]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_compare(args: argparse.Namespace) -> int:
    from lorafleet.compare import new_output_dir, refuse_rung_misfits, run_ladder
    from lorafleet.config import default_home
    from lorafleet.config.compare import load_compare_config
    from lorafleet.report import REPORT_FILES

    ladder = load_compare_config(args.config, args.set, default_home())
    if args.dry_run:
        for rung, cfg in ladder.rungs.items():
            print(f"{rung}: method={cfg.method.name} steps={cfg.train.max_steps} lr={cfg.train.lr:g} "
                  f"workers={cfg.scaling.num_workers}")
        return 0
    cluster = cluster_from_args(args)
    refuse_rung_misfits(ladder, cluster)  # before the ladder's folder is made
    out_dir = new_output_dir(ladder, args.out)
    _say(f"[compare] {len(ladder.rungs)} rungs -> {out_dir}")
    rows, out_dir = run_ladder(ladder, out_dir, progress=not (args.quiet or args.json), log=_say, cluster=cluster)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows]))
    else:
        print((out_dir / REPORT_FILES["markdown"]).read_text())
        print(f"report: {out_dir / REPORT_FILES['markdown']}\nchart:  {out_dir / REPORT_FILES['chart']}")
    return 0


def _prompt_setup(args: argparse.Namespace, home: Path) -> tuple[Any, list]:
    """(training config, templates) from a compare config or a plain training config."""
    from lorafleet.config import load_config, read_yaml
    from lorafleet.config.compare import load_compare_config
    from lorafleet.prompts import default_templates

    raw = read_yaml(args.config) if Path(args.config).is_file() else {}
    if {"base", "base_config", "rungs"} & raw.keys():
        ladder = load_compare_config(args.config, args.set, home)
        cfg = next(iter(ladder.rungs.values()))
        return cfg, ladder.config.prompts or default_templates(ladder.config.few_shot_k)
    return load_config(args.config, args.set, home), default_templates(args.k or 3)


def _artifact(args: argparse.Namespace, home: Path) -> str | None:
    """The folder to prompt: --adapter resolved (and verified) in the registry, else --artifact."""
    if not args.adapter:
        return args.artifact
    from lorafleet.registry import Registry

    from lorafleet.config import registry_root

    reg = Registry(registry_root(home))
    return str(reg.local_path(reg.resolve(args.adapter)))  # checked against its sha256 sums


def cmd_prompts(args: argparse.Namespace) -> int:
    from lorafleet.config import default_home, validate
    from lorafleet.config.prompts import PromptTemplate
    from lorafleet.prompts import run_prompt_lab
    from lorafleet.report import prompt_table

    home = default_home()
    cfg, templates = _prompt_setup(args, home)
    if args.template:
        templates = [validate(PromptTemplate, {"name": f"--template {i + 1}", "instruction": t.replace("\\n", "\n"),
                                               "k": args.k or 0}, "--template")
                     for i, t in enumerate(args.template)]
    artifact = _artifact(args, home)
    results = run_prompt_lab(cfg, templates, artifact=artifact, split=args.split, limit=args.limit, seed=args.seed)
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"model: {cfg.model.name_or_path}" + (f" + {args.adapter or artifact}" if artifact else " (base)"))
    print(prompt_table(results))
    best = max(results, key=lambda r: r["value"]) if results else None
    if best and best.get("example"):
        print(f"best: {best['template']}; its first prompt:\n---\n{best['example']['prompt']}\n---\n"
              f"prediction: {best['example']['prediction']!r}  target: {best['example']['target']!r}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `compare` and `prompts`."""
    p = sub.add_parser("compare", help="run the method ladder (prompting ... full fine-tuning) and report it")
    p.add_argument("config", help="compare YAML (see configs/tiny/compare-*.yaml)")
    add_overrides(p, "dotted override of the compare config, e.g. base.train.max_steps=60 or rungs=[lora,full]")
    p.add_argument("--out", help="the ladder's folder (default: <output_dir>/<name>-<timestamp>)")
    add_output(p, "print the rows as JSON on stdout (progress goes to stderr)", "no live training progress")
    p.add_argument("--dry-run", action="store_true", help="validate the config and list the rungs; run nothing")
    add_cluster(p, "refuse at once a ladder with a rung that cannot be placed or fit there")
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("prompts", help="prompt lab: score prompt templates (wording, zero/few-shot) on a model")
    p.add_argument("config", help="a compare YAML (uses its `prompts:` templates) or a training YAML")
    add_overrides(p, "dotted override of the config")
    p.add_argument("--template", action="append", metavar="TEXT",
                   help="an instruction format string instead of the config's templates, e.g. "
                        "'Ticket: {text}\\nQueue:\\n' (repeatable; '\\n' is a newline)")
    p.add_argument("--k", type=int, help="in-context examples for --template (default 0); a training YAML's k-shot row (default 3)")
    p.add_argument("--adapter", help="registry ref (name or name@version) of a LoRA or full artifact to prompt")
    p.add_argument("--artifact", help="a LoRA adapter or full-model folder to prompt (instead of --adapter)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--limit", type=int, help="score only the first N rows")
    p.add_argument("--seed", type=int, default=0, help="picks the in-context examples")
    add_output(p, "print the results as JSON")
    p.set_defaults(fn=cmd_prompts)
