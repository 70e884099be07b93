"""Which model answers each output column, and with which prompt contract: decided once, on the driver.

An adapter is resolved to its exact registry version and checked the way serving checks it
(`lorafleet.serving.catalog.AdapterCatalog`: a LoRA adapter, trained on this base, not DoRA), and
its task is taken *as it was trained* (labels, languages, instruction line, answer budget), so a
column's prompts are the ones training, evaluation and serving build for that adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.config.predict import PredictSettings
from lorafleet.offline_engine import VLLM_RANKS, vllm_lora_rank
from lorafleet.registry import Registry, RegistryError
from lorafleet.tasks import GENERATING_TASKS, Task, get_task

__all__ = ["Column", "PredictError", "Plan", "plan_columns", "lora_rank_for"]

BASE = "base"


class PredictError(RegistryError):
    """An adapter predict cannot use, or settings that do not fit the registry (one `error:` line)."""


@dataclass(frozen=True)
class Column:
    """One output column.

    Attributes:
        name: The column's name: the reference as given (``tickets``, ``tickets@2``, ``base``).
        ref: The exact version (``tickets@2``) or ``base``: what each answer reports as ``adapter``.
        task: The task as the adapter was trained (its prompt contract).
        budget: Answer tokens of a generating task (unused for classification).
        rank: The adapter's LoRA rank (None for the base model).
    """

    name: str
    ref: str
    task: Task
    budget: int
    rank: int | None = None


@dataclass(frozen=True)
class Plan:
    """The columns, the base model they run on, and the data's field mapping."""

    columns: list[Column]
    base_model: str
    fields: dict[str, str]

    def tasks(self) -> list[Task]:
        return [c.task for c in self.columns]


def plan_columns(settings: PredictSettings, registry_root: str | Path, home: str | Path) -> Plan:
    """Resolve every column of ``settings`` (all problems about the adapters raise one PredictError)."""
    from lorafleet.serving.catalog import AdapterCatalog
    from lorafleet.serving.compat import adapter_config
    from lorafleet.serving.errors import ServingError

    refs = [a for a in settings.adapters if a != BASE]
    first = Registry(registry_root).resolve(refs[0]) if refs else None
    base = settings.base_model or (first.meta.base_model if first is not None else None) or \
        str(Path(home) / "models" / "tiny")
    if not (Path(base) / "config.json").is_file():
        raise PredictError(f"base model {base!r} is not a model folder (no config.json); pass --base-model")
    catalog = AdapterCatalog(registry_root, BASE, max_lora_rank=VLLM_RANKS[-1], base_path=base)
    adapters: dict[str, Column] = {}
    problems = []
    for ref in refs:
        try:
            entry = catalog.route(ref).entry
        except ServingError as exc:
            problems.append(str(exc))
            continue
        if not entry.meta.task:
            problems.append(f"{entry.ref} records no task in its metadata; predict needs its prompt contract")
            continue
        task = catalog.task_spec(entry, entry.meta.task)
        rank = adapter_config(entry).get("r")
        adapters[ref] = Column(ref, entry.ref, task, _budget(task, settings), int(rank) if isinstance(rank, int) else None)
    if problems:
        raise PredictError("; ".join(problems))
    columns = [adapters[a] if a != BASE else _base_column(settings, list(adapters.values())) for a in settings.adapters]
    fields = settings.fields or (_trained_fields(first.meta.config) if first is not None else {})
    return Plan(columns, str(base), fields)


def lora_rank_for(columns: list[Column]) -> int:
    """The smallest max_lora_rank vLLM accepts that holds every adapter's rank."""
    return vllm_lora_rank(max((c.rank or 1 for c in columns if c.ref != BASE), default=1))


def _base_column(settings: PredictSettings, adapters: list[Column]) -> Column:
    """The bare base model, prompted as the first adapter's task was trained (or with --task's defaults)."""
    if adapters and settings.task in (None, adapters[0].task.name):
        task = adapters[0].task
    else:
        task = get_task(settings.task)
    return Column(BASE, BASE, task, _budget(task, settings))


def _budget(task: Task, settings: PredictSettings) -> int:
    if settings.max_new_tokens and task.name in GENERATING_TASKS:
        return settings.max_new_tokens
    return task.max_new_tokens


def _trained_fields(config: dict[str, Any] | None) -> dict[str, str]:
    """``data.fields`` of an adapter's training config (None or absent: no mapping)."""
    data = (config or {}).get("data") or {}
    fields = data.get("fields") if isinstance(data, dict) else None
    return dict(fields) if isinstance(fields, dict) else {}
