"""One run's inputs, resolved once on the driver: the config, its task and labels, the data splits
and where the run lives. `finetune()`, a sweep trial and a compare rung all build a `RunContext`.

A run folder holds the resolved config (`lorafleet-config.yaml`, written before training), Ray
Train's checkpoints, `train_log.jsonl`, the best checkpoint's model (`artifact/`) and
`summary.json`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from lorafleet.config import FinetuneConfig, dump_config, read_yaml, validate
from lorafleet.data import DataError, Example, encode_rows, read_data_split
from lorafleet.tasks import Task, get_task
from lorafleet.uri import exists, is_uri, join, parent_and_name, read_text, write_text

__all__ = [
    "ARTIFACT_DIR",
    "CONFIG_FILE",
    "SPLITS",
    "RunContext",
    "RunPlace",
    "place_run",
    "read_rows",
    "resolve_labels",
    "run_dir_config",
    "task_labels",
]

CONFIG_FILE = "lorafleet-config.yaml"  # the resolved config, saved in the run folder before training
ARTIFACT_DIR = "artifact"  # the best checkpoint's model, inside a local run folder
SPLITS = ("train", "validation", "test")


# --- where the run lives ----------------------------------------------------------------------------


@dataclass
class RunPlace:
    """A run's name and folder (`dir` is None when `storage` is object storage, s3://...)."""

    cfg: FinetuneConfig  # with run.storage_path pointing at the resumed folder's parent, if resumed
    name: str
    storage: str
    dir: Path | None

    @property
    def location(self) -> str | Path:
        """The run folder: `dir`, or `<storage>/<name>` in an object store (where Ray Train writes too)."""
        return self.dir if self.dir is not None else join(self.storage, self.name)

    def file(self, name: str) -> str:
        """Where the run's own file `name` goes (config, log, summary), beside Ray Train's checkpoints."""
        return str(join(self.location, name))

    def save_config(self) -> None:
        """Save the resolved config in the run folder before training: what `--resume` reads back."""
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        write_text(self.file(CONFIG_FILE), dump_config(self.cfg))


def place_run(cfg: FinetuneConfig, resume_dir: str | Path | None = None) -> RunPlace:
    """Where a run lives. A fresh run always gets a unique name: reusing (name, storage_path) makes
    Ray Train resume the old run, which only an explicit `resume_dir` (--resume, or a sweep trial
    restarted by Tune) may do."""
    cfg = resolve_labels(cfg)  # the run's config names its label set (a no-op on a resolved config)
    if resume_dir is not None:
        storage, name = parent_and_name(resume_dir)
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"storage_path": storage})})
    else:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
        name = cfg.run.name or f"{cfg.name}-{stamp}"
        storage = cfg.run.storage_path
    run_dir = Path(storage) / name if not is_uri(storage) else None
    if run_dir is not None and resume_dir is None and run_dir.exists():
        raise FileExistsError(f"run folder {run_dir} exists; use `lorafleet train --resume {run_dir}` to continue it")
    return RunPlace(cfg, name, storage, run_dir)


def run_dir_config(run_dir: str | Path) -> FinetuneConfig:
    """The resolved config saved in a run folder, local or s3://... (for --resume)."""
    path = join(run_dir, CONFIG_FILE)
    if not exists(path):
        raise FileNotFoundError(f"{path} not found: is {run_dir} a lorafleet run folder (…/runs/<run-name>)?")
    raw = yaml.safe_load(read_text(path)) if is_uri(path) else read_yaml(path, "run config")
    return validate(FinetuneConfig, raw, str(path))


# --- data ---------------------------------------------------------------------------------------------


def _resolve_labels(cfg: FinetuneConfig) -> tuple[FinetuneConfig, list[Example] | None]:
    """(`cfg` with `task.labels` filled in, the training split read to find them or None).

    A classification run on the user's data that names no labels gets the training split's distinct
    labels, sorted. The resolved labels then travel with the run's config (workers, checkpoints,
    registry metadata), so every prompt lists the same labels. Synthetic data keeps the synthetic
    task's own labels (and `task.labels` stays unset)."""
    if cfg.task.name != "classification" or cfg.task.labels or cfg.data.train == "synthetic":
        return cfg, None
    open_set = replace(get_task(cfg.task), labels=())  # any label passes while the set is collected
    examples = read_data_split(cfg.data, open_set, "train")
    labels = sorted({open_set.target(ex.row) for ex in examples})
    if len(labels) < 2:
        raise DataError(f"{cfg.data.train}: the training split has only the label(s) {labels}; a classifier "
                        "needs at least 2 (or list them in task.labels)")
    return cfg.model_copy(update={"task": cfg.task.model_copy(update={"labels": labels})}), examples


def resolve_labels(cfg: FinetuneConfig) -> FinetuneConfig:
    """`cfg` with `task.labels` filled in from the training split when a classification run on the
    user's data names none (see `_resolve_labels`)."""
    return _resolve_labels(cfg)[0]


def task_labels(cfg: FinetuneConfig) -> tuple[Task, list[str] | None]:
    """(task, labels): the config's task, configured, and its label set (`task.labels`, else the
    training split's, else the synthetic task's; None for generative tasks)."""
    task = get_task(resolve_labels(cfg).task)
    return task, list(task.labels) or None


def read_rows(cfg: FinetuneConfig, split: str) -> list[dict[str, Any]]:
    """One split's rows, read exactly as training and `lorafleet eval` read them."""
    task, _ = task_labels(cfg)
    return [ex.row for ex in read_data_split(cfg.data, task, split)]


@dataclass
class RunContext:
    """What one run trains on, resolved once on the driver and passed down: the config (labels
    resolved; a resumed run's storage), the configured task, its labels, every split's validated
    rows and where the run lives. Bad data fails here, before Ray or any worker starts."""

    cfg: FinetuneConfig
    task: Task
    labels: list[str] | None
    splits: dict[str, list[Example]]
    place: RunPlace

    @classmethod
    def build(cls, cfg: FinetuneConfig, resume_dir: str | Path | None = None) -> RunContext:
        """Resolve `cfg`'s labels, read and validate its splits (the training split once, even when
        the labels come from it) and place the run (a fresh folder, or `resume_dir`'s)."""
        cfg, train = _resolve_labels(cfg)
        task = get_task(cfg.task)  # configured: the run's labels, languages and instruction line
        splits = {split: (train if split == "train" and train is not None else read_data_split(cfg.data, task, split))
                  for split in SPLITS}
        place = place_run(cfg, resume_dir)
        return cls(place.cfg, task, list(task.labels) or None, splits, place)

    def rows(self, split: str) -> list[dict[str, Any]]:
        """A split's rows (dicts), as the task reads them."""
        return [ex.row for ex in self.splits[split]]

    def encode(self, tokenizer) -> list[dict[str, list[int]]]:
        """The training split's token ids and loss labels; the other splits are length-checked too,
        so a row over `data.max_seq_len` anywhere fails before training (unless `data.truncate` cuts it)."""
        max_len, truncate = self.cfg.data.max_seq_len, self.cfg.data.truncate
        head_labels = self.labels if self.cfg.method.name == "head" else None
        encoded = encode_rows(tokenizer, self.task, self.splits["train"], max_len, head_labels=head_labels,
                              truncate=truncate)
        encode_rows(tokenizer, self.task, self.splits["validation"] + self.splits["test"], max_len, truncate=truncate)
        return encoded
