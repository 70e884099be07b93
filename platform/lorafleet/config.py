"""Typed run configuration: one YAML per run, validated once on the driver before any worker starts.

The resolved config (defaults filled in, paths made absolute) travels with every checkpoint,
registry entry and sweep trial, so any artifact can be traced back to exactly what made it.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "ConfigError",
    "FinetuneConfig",
    "default_home",
    "load_config",
    "apply_overrides",
    "dump_config",
]

METHODS = ("full", "partial", "lora", "head", "feature")
_SEP = " || "  # joins cross-field problems inside one ValidationError
TASKS = ("classification", "summarization", "translation", "qa", "instruction", "text")


class ConfigError(ValueError):
    """Every problem found in a config, reported at once."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid config {source}: {len(problems)} problem(s)\n{lines}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name_or_path: str = Field(
        "${home}/models/tiny",
        description="Hugging Face hub id or local folder of any causal LM transformers loads. "
        "'${home}' expands to the lorafleet home (the tiny model `lorafleet base build` makes).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype for loading; training autocasts to bf16 on GPU."
    )
    trust_remote_code: bool = False


class TaskConfig(_Section):
    name: Literal["classification", "summarization", "translation", "qa", "instruction", "text"] = (
        Field("classification", description="Prompt contract, target format and metric.")
    )
    labels: list[str] | None = Field(
        None, description="Classification labels; default: the synthetic task's labels."
    )


class DataConfig(_Section):
    train: str = Field(
        "synthetic",
        description="'synthetic', a local .jsonl/.csv/.parquet file, or 'hf:<dataset_id>[:<split>]'.",
    )
    validation: str = "synthetic"
    test: str = "synthetic"
    fields: dict[str, str] = Field(
        default_factory=dict, description="Task field -> column name in the data, e.g. {text: body}."
    )
    synthetic_sizes: dict[str, int] = Field(
        default_factory=lambda: {"train": 2000, "validation": 200, "test": 200}
    )
    max_seq_len: int = Field(256, ge=16, description="Longer examples are an error, not truncated.")
    seed: int = 0


class LoraSettings(_Section):
    r: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names, or 'all-linear'.",
    )
    use_dora: bool = False
    use_rslora: bool = False


class MethodConfig(_Section):
    name: Literal["full", "partial", "lora", "head", "feature"] = "lora"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    partial_layers: int = Field(1, ge=1, description="partial: train the last N blocks + output layer.")


class TrainConfig(_Section):
    max_steps: int = Field(300, ge=1, description="Optimizer steps; the smoke knob for tests.")
    batch_size: int = Field(16, ge=1, description="Per-worker micro-batch size.")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(20, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    grad_checkpointing: bool = False
    seed: int = 0
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(100, ge=1, description="Validation metric + checkpoint every N steps.")
    eval_samples: int = Field(64, ge=1, description="Validation rows scored at each eval.")
    keep_checkpoints: int = Field(2, ge=1, description="Best K checkpoints kept (plus the latest).")


class ScalingConfig(_Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    strategy: Literal["ddp", "fsdp"] = "ddp"
    max_failures: int = Field(1, ge=0, description="Worker failures survived (restart from checkpoint).")


class RunConfig(_Section):
    storage_path: str = Field(
        "${home}/runs", description="Checkpoints; a local folder or an s3:// / gs:// URI."
    )
    name: str | None = Field(None, description="Run name; default '<name>-<timestamp>' (unique).")


class FinetuneConfig(_Section):
    """One training run: what to train, on what, how, where."""

    name: str = Field("adapter", description="Registry name of the resulting artifact.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    register_artifact: bool = Field(True, description="Register the best checkpoint when the run finishes.")

    @model_validator(mode="after")
    def _cross_checks(self) -> "FinetuneConfig":
        problems: list[str] = []
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", self.name):
            problems.append(
                f"name {self.name!r} is not a valid artifact name: use letters, digits, '.', '_' or '-'"
            )
        if self.method.name in ("head", "feature") and self.task.name != "classification":
            problems.append(
                f"method {self.method.name!r} needs task 'classification' (got {self.task.name!r}); "
                "use 'lora', 'partial' or 'full' for generative tasks"
            )
        if self.scaling.strategy == "fsdp" and self.method.name != "full":
            problems.append(
                f"scaling.strategy 'fsdp' is for method 'full' (got {self.method.name!r}); use 'ddp'"
            )
        if self.model.dtype != "float32" and not self.scaling.use_gpu:
            problems.append(
                f"model.dtype {self.model.dtype!r} is not supported for CPU training; use 'float32' "
                "(bf16 autocast is used automatically on GPU)"
            )
        if problems:
            raise ValueError(_SEP.join(problems))
        return self


def default_home() -> Path:
    """The lorafleet home: `LORAFLEET_HOME` or ./.lorafleet."""
    return Path(os.environ.get("LORAFLEET_HOME", ".lorafleet")).resolve()


def _parse_value(text: str) -> Any:
    # YAML scalars: "3e-4" -> float, "true" -> bool, "[a, b]" -> list, anything else a string.
    value = yaml.safe_load(text)
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
        return float(value)  # YAML 1.1 reads "3e-4" as a string
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted `key=value` overrides (`train.lr=3e-4`) to a raw config dict."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError("overrides", [f"override {item!r} must look like section.key=value"])
        key, text = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError("overrides", [f"override {item!r}: {part!r} is not a section"])
        node[parts[-1]] = _parse_value(text)
    return out


def _expand(value: str, home: Path) -> str:
    return value.replace("${home}", str(home))


def _absolute_if_local(value: str) -> str:
    if value == "synthetic" or value.startswith(("hf:", "s3://", "gs://", "abfss://")):
        return value
    p = Path(value).expanduser()
    return str(p.resolve()) if (p.exists() or value.startswith((".", "/", "~"))) else value


def resolve(cfg: FinetuneConfig, home: Path) -> FinetuneConfig:
    """Expand ${home} and make local paths absolute, so the config means the same in every worker."""
    cfg = cfg.model_copy(deep=True)
    cfg.model.name_or_path = _absolute_if_local(_expand(cfg.model.name_or_path, home))
    cfg.run.storage_path = _absolute_if_local(_expand(cfg.run.storage_path, home))
    for split in ("train", "validation", "test"):
        setattr(cfg.data, split, _absolute_if_local(_expand(getattr(cfg.data, split), home)))
    return cfg


def _format_errors(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see configs/ for the valid keys)"
        for part in msg.split(_SEP) if not loc else [msg]:
            problems.append(f"{loc}: {part}" if loc else part)
    return problems


def parse_config(raw: dict[str, Any], source: str = "<dict>", home: Path | None = None) -> FinetuneConfig:
    """Validate a raw dict into a resolved FinetuneConfig; all problems are raised together."""
    try:
        cfg = FinetuneConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(source, _format_errors(err)) from None
    return resolve(cfg, home or default_home())


def load_config(
    path: str | Path, overrides: list[str] | None = None, home: Path | None = None
) -> FinetuneConfig:
    """Read a YAML config, apply dotted overrides, validate and resolve it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), [f"config file not found: {path}"])
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(str(path), [f"not valid YAML: {err}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), ["the top level must be a mapping of sections"])
    return parse_config(apply_overrides(raw, overrides or []), str(path), home)


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (what is saved beside every artifact)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
