"""The settings of one `lorafleet predict` run (batch inference, `lorafleet.predict`).

The CLI and `jobs/predict.py` build them from flags; every problem is reported at once, as a
`ConfigError`, before Ray or any engine starts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lorafleet.config.base import Section, problems_error
from lorafleet.tasks import TASK_NAMES

__all__ = ["PredictSettings", "OUTPUT_FORMATS"]

OUTPUT_FORMATS = ("jsonl", "parquet")


class PredictSettings(Section):
    """What to predict with, on which data, written where, on how many engines."""

    adapters: list[str] = Field(min_length=1, description="One output column each: a registry ref (name, "
                                "name@version, name@alias) or 'base' (the bare base model). All share one engine.")
    data: str = Field(description="The rows: a .jsonl/.csv/.parquet file (local, s3://, gs://) or hf:<id>[:<split>].")
    out: str = Field(description="Output folder (local or s3://): one part file per input block, named by its "
                     "index, so a run started again writes only the blocks that are missing.")
    format: Literal["jsonl", "parquet"] = Field(default="jsonl", description="Part file format.")
    task: str | None = Field(default=None, description="The task of the 'base' column (default: the first "
                             "adapter's task as it was trained); required when 'base' is the only column.")
    fields: dict[str, str] = Field(default_factory=dict, description="Task field -> column of the data, as "
                                   "data.fields in training (default: the first adapter's training config's).")
    split: str = Field(default="test", description="The split of an hf: dataset without one in its id.")
    base_model: str | None = Field(default=None, description="The base model folder (default: the base the "
                                   "adapters were trained on; with only 'base': <home>/models/tiny).")
    replicas: int = Field(default=1, ge=1, description="vLLM engines (Ray Data actors), each on its own CPU or GPU.")
    block_rows: int = Field(default=512, ge=1, description="Rows per block: the unit of work, of writing and of resuming.")
    max_new_tokens: int | None = Field(default=None, ge=1, description="Answer budget of the generating tasks "
                                       "(default: each adapter's own, from its registry metadata or task).")
    max_model_len: int = Field(default=512, ge=16, description="vLLM's context window; a row whose prompt plus "
                               "answer budget exceeds it is reported and skipped.")
    dtype: str = Field(default="float32", description="vLLM's dtype (float32 matches transformers token for token).")
    accelerator: Literal["auto", "cpu", "gpu"] = Field(default="auto", description="Engines on CPUs or one GPU "
                                                       "each; auto: GPU when the Ray cluster has GPUs.")
    kv_cache_gib: int = Field(default=1, ge=1, description="VLLM_CPU_KVCACHE_SPACE per engine on CPU.")

    @model_validator(mode="after")
    def _check(self) -> "PredictSettings":
        problems = []
        if len(set(self.adapters)) != len(self.adapters):
            problems.append(f"adapters: {self.adapters} names a column twice; give each adapter once")
        if self.task is not None and self.task not in TASK_NAMES:
            problems.append(f"task: {self.task!r} is not a task; valid tasks: {list(TASK_NAMES)}")
        if self.adapters == ["base"] and self.task is None:
            problems.append("task: predicting with the bare base model alone needs --task (the prompt contract)")
        if problems:
            raise problems_error(problems)
        return self
