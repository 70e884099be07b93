"""The typed view of a version's ``lorafleet.json``: what an artifact is, how it scored, its config.

Written by training (``train.results.run_metadata``, which sweeps and the method ladder reuse) and
read by everyone else (serving, ``lorafleet eval``, the registry table) through ``Entry.meta``, so
no caller spells a key as a string. The JSON on disk is unchanged: :meth:`ArtifactMetadata.dump`
gives exactly the keys that were set (``labels: null`` stays, an unknown ``total_params`` is left
out), and unknown keys, from older or newer writers, are kept (``extra="allow"``).

Reading is lenient (:meth:`ArtifactMetadata.read`): a registry written by an older version may lack
any key, and a key holding a value of the wrong type reads as missing instead of making the whole
version unreadable. Writing validates: a writer's wrong type is its bug, raised at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["ArtifactMetadata", "SweepOrigin"]


class SweepOrigin(BaseModel):
    """Where a sweep's registered winner came from (``sweep`` in ``lorafleet.json``)."""

    model_config = ConfigDict(extra="allow")

    name: str | None = Field(None, description="The sweep's name.")
    dir: str | None = Field(None, description="The sweep folder (results.json, table, plot).")
    trial_id: str | None = Field(None, description="The winning trial.")
    metric: str | None = Field(None, description="The metric trials were ranked by.")
    value: float | int | None = Field(None, description="The winner's best value of that metric.")
    params: dict[str, Any] | None = Field(None, description="The winner's sampled hyperparameters.")
    trials: int | None = Field(None, description="How many trials the sweep ran.")


class ArtifactMetadata(BaseModel):
    """A registry version's metadata (``lorafleet.json``); every field may be missing in old versions.

    The registry's own keys (``name``, ``version``, ``created``, ``files``, ``size_bytes``) are
    written by ``Registry.register`` and win over a caller's; the rest is the caller's.
    """

    model_config = ConfigDict(extra="allow")

    # ----- the registry's keys ----------------------------------------------------------------
    name: str | None = Field(None, description="Artifact name (registry-written).")
    version: str | None = Field(None, description="Version number as a string (registry-written).")
    created: str | None = Field(None, description="UTC ISO time of registration (registry-written).")
    files: dict[str, str] | None = Field(None, description="Relative path -> sha256 of every file (registry-written).")
    size_bytes: int | None = Field(None, description="Total bytes of the files (registry-written).")
    # ----- what the artifact is -----------------------------------------------------------------
    base_model: str | None = Field(None, description="The base model it was trained on (path or hub id).")
    base_fingerprint: str | None = Field(
        None, description="`base_model.base_fingerprint` of that base; serving refuses another base.")
    task: str | None = Field(None, description="The task it was trained for (classification, translation, ...).")
    method: str | None = Field(None, description="Training method: lora, full, partial, head, feature.")
    labels: list[str] | None = Field(None, description="Classification labels, in the prompt's order.")
    source_lang: str | None = Field(None, description="Translation: the language it translates from.")
    target_lang: str | None = Field(None, description="Translation: the language it translates to.")
    max_new_tokens: int | None = Field(
        None, ge=1, description="Generating tasks: the answer budget it was evaluated with (`task.max_new_tokens`, "
        "resolved), the task endpoints' default; missing in older versions (serving then uses the task's own).")
    # ----- how it was made and how it scored ------------------------------------------------------
    metrics: dict[str, Any] | None = Field(None, description="Scores by split, e.g. {'test': {'accuracy': 0.9}}.")
    trainable_params: int | None = Field(None, description="Parameters that trained.")
    total_params: int | None = Field(None, description="All parameters of the model; missing when not known "
                                                       "(a sweep's trial does not report it).")
    wall_time_s: float | int | None = Field(None, description="Training wall time in seconds.")
    steps: int | None = Field(None, description="Optimizer steps (the best checkpoint's for a sweep winner).")
    run: str | None = Field(None, description="The run folder (or a sweep trial's).")
    config: dict[str, Any] | None = Field(None, description="The resolved training config (`FinetuneConfig`).")
    sweep: SweepOrigin | None = Field(None, description="Set when a sweep registered its winner.")

    @classmethod
    def read(cls, raw: Mapping[str, Any] | None) -> ArtifactMetadata:
        """The typed view of stored metadata: missing keys are None, unknown keys kept, and a known
        key holding a value of the wrong type reads as missing."""
        data = dict(raw or {})
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            bad = {err["loc"][0] for err in exc.errors() if err["loc"]}
            return cls.model_validate({k: v for k, v in data.items() if k not in bad})

    def dump(self) -> dict[str, Any]:
        """The JSON-ready dict for ``lorafleet.json``: the keys that were set, unknown ones included."""
        return self.model_dump(mode="python", exclude_unset=True)

    @property
    def test_metrics(self) -> dict[str, Any]:
        """The test split's scores (``metrics.test``); {} when not recorded."""
        test = (self.metrics or {}).get("test")
        return test if isinstance(test, dict) else {}

    @property
    def task_config(self) -> dict[str, Any] | None:
        """The ``task:`` section of the training config (labels, languages, instruction), if recorded."""
        section = (self.config or {}).get("task")
        return section if isinstance(section, dict) else None

    def lists_file(self, rel: str) -> bool:
        """Whether the version's file list (``files``) holds ``rel``."""
        return rel in (self.files or {})
