"""`lorafleet base build`: the embedded default base model, from nothing to a usable starting point.

Step 1 trains the tokenizer and initialises a seeded tiny Llama (lorafleet.base_model). Step 2 is a
short full pre-training pass on the bundled corpus, itself an ordinary lorafleet full fine-tuning
run on Ray Train (task 'text': loss on every token), so the adapters later start from a model that
knows the language of the synthetic domains and the instruction format, but none of the tasks.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

from lorafleet.base_model import build_tokenizer, check_build_target, init_model, install_build, save_pretrained
from lorafleet.config import parse_config
from lorafleet.tasks import TASK_NAMES, get_task, pretraining_corpus

__all__ = ["build_base"]


def _task_prompts(n: int, seed: int) -> list[str]:
    """Prompts (never answers) of the evaluated tasks' train splits.

    A base model should know the words its users write, including the label names a prompt lists
    ("... one of: billing, technical, account, shipping"); it does not learn which answer goes with
    which input, which is what fine-tuning teaches. Without this, label words are rare BPE pieces
    the frozen output layer has never produced, and LoRA must learn to spell them.
    """
    per_task = max(1, n // len(TASK_NAMES))
    return [get_task(name).instruction(row) for name in TASK_NAMES if name != "instruction"
            for row in get_task(name).synthetic("train", per_task, seed=seed + 17)]


def build_base(out: str | Path, *, steps: int = 600, num_workers: int = 2, corpus_size: int = 6000,
               seed: int = 0, home: Path | None = None, progress: bool = True) -> Path:
    """Build the tiny base model into `out`. Returns `out`.

    An earlier build at `out` is replaced once the new one is complete; any other non-empty folder
    there is refused before anything runs (`base_model.check_build_target`): never deleted."""
    from lorafleet.train.recipe import finetune

    out = check_build_target(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    init_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}-init-", dir=out.parent))  # ours to delete
    corpus = pretraining_corpus(corpus_size, seed=seed) + _task_prompts(corpus_size // 6, seed)
    tokenizer = build_tokenizer(corpus)
    save_pretrained(init_model(tokenizer, seed=seed), tokenizer, init_dir)
    # The corpus goes through the ordinary local-file data path (JSONL, one {"text": ...} per line).
    random.Random(seed).shuffle(corpus)
    n_val = 64
    for split, texts in (("train", corpus[n_val:]), ("validation", corpus[:n_val])):
        with open(init_dir / f"corpus-{split}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    if steps == 0:
        return install_build(init_dir, out, {"steps": 0, "seed": seed})

    cfg = parse_config(
        {
            "name": "tiny-base",
            "model": {"name_or_path": str(init_dir)},
            "task": {"name": "text"},
            "data": {"train": str(init_dir / "corpus-train.jsonl"),
                     "validation": str(init_dir / "corpus-validation.jsonl"),
                     "test": str(init_dir / "corpus-validation.jsonl")},
            "method": {"name": "full"},
            "train": {"max_steps": steps, "batch_size": 16, "lr": 3e-3, "warmup_steps": 30,
                      "eval_every": steps, "log_every": 20, "eval_samples": 64, "keep_checkpoints": 1},
            "scaling": {"num_workers": num_workers},
            "register_artifact": False,
        },
        "base build",
        home,
    )
    summary = finetune(cfg, registry_root=out.parent / ".unused-registry", progress=progress)
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}-build-", dir=out.parent))
    shutil.copytree(summary.artifact_dir, staged, dirs_exist_ok=True)
    install_build(staged, out, {"steps": steps, "seed": seed, "run": summary.run_dir})
    shutil.rmtree(init_dir, ignore_errors=True)  # made by mkdtemp above
    return out
