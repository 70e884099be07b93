"""What one training worker holds, part by part: the planner's formulas (`lorafleet.train.plan` checks
them against a cluster).

Parameters are counted exactly: the model is built on the meta device from its config.json with the
method applied (`steps.build_model(skeleton=True)`: no weights read, no memory). The rest are formulas,
per rank, in bytes (estimates, not measurements; c = bytes of the compute dtype: 2 on a GPU):

  weights       frozen x bytes(model.dtype) + trainable x 4 (fp32 master weights); under fsdp rank 0's
                share: each tensor's rows split over the ranks, ceil(rows / ranks)
  gradients     trainable x 4, sharded likewise
  optimizer     AdamW: trainable x 8 (two fp32 moments) + 4 (its step count) per trainable tensor
  ddp buckets   trainable x 4: DDP all-reduces a second copy of the gradients (2 or more workers)
  fsdp gathered the root unit (embeddings, final norm, output layer: gathered for the whole step) and two
                blocks (one computing, one prefetched) in c, with their unsharded gradients (c + 4)
  activations   per token and layer of a Llama block: c x (11 h + 2 kv + 4 i) (norm inputs, q/k/v and the
                attention output, the MLP's gate, up, activation and product); with gradient checkpointing
                each block's input (c x h) + one block's activations, recomputed in backward. Only layers
                that gradients flow through count (partial: its last N; head: none)
  logits        tokens x vocab x 12: the logits, their fp32 copy and the fp32 log-softmax the loss keeps
  runtime       1 GiB per GPU: CUDA context, cuBLAS and NCCL workspaces
tokens = train.batch_size x data.max_seq_len (a batch's longest), h = hidden size, kv = key/value heads x
head dim, i = the MLP's width. cpu_offload keeps weights, gradients and optimizer state in host memory.
Serving: `lorafleet.train.plan_serve`. `with_sets` and `device_bytes` serve the planner's fixes
and the what-fits table (`lorafleet.train.plan_table`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from lorafleet.config import FinetuneConfig, apply_overrides
from lorafleet.train.clusters import GiB

__all__ = ["DTYPE_BYTES", "RUNTIME_BYTES", "ModelShape", "Part", "device_bytes", "inference_parts", "model_shape",
           "training_parts", "with_sets"]

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
NF4_BYTES = 0.5625  # bitsandbytes NF4: 4 bits a weight + one fp32 absmax per block of 64 weights
RUNTIME_BYTES = GiB


@dataclass(frozen=True)
class ModelShape:
    """A model's parameters as built (method applied), and the widths the formulas use."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    kv: int  # key/value heads x head dim
    vocab: int
    tensors: tuple[tuple[int, int, bool], ...]  # (rows, elements, trainable) of every parameter
    block: tuple[int, int]  # (parameters, trainable) of the largest decoder block
    root: tuple[int, int]  # (parameters, trainable) outside the decoder blocks

    @property
    def params(self) -> int:
        return sum(n for _, n, _ in self.tensors)

    @property
    def trainable(self) -> int:
        return sum(n for _, n, t in self.tensors if t)

    @property
    def trainable_tensors(self) -> int:
        return sum(1 for *_, t in self.tensors if t)

    def rank_share(self, ranks: int) -> tuple[int, int]:
        """(frozen, trainable) elements rank 0 holds with every tensor's rows split over `ranks` (FSDP2)."""
        out = [0, 0]
        for rows, n, trainable in self.tensors:
            out[trainable] += math.ceil(rows / ranks) * (n // rows) if rows else n
        return out[0], out[1]


def model_shape(cfg: FinetuneConfig, model_config: str | Path | None = None, *, method: bool = True) -> ModelShape:
    """The shape of `cfg`'s model with its method applied (``method=False``: the bare base), built on
    the meta device from config.json: the model's folder, its Hugging Face cache entry, or `model_config`
    (a config.json or its folder). Raises FileNotFoundError, saying the fix, when there is none."""
    from lorafleet.base_model import model_folder

    folder = Path(model_config) if model_config else model_folder(cfg.model.name_or_path)
    if folder is not None and folder.is_file():
        folder = folder.parent
    if folder is None or not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_config or cfg.model.name_or_path}: no config.json there nor in the Hugging Face cache; pass "
            "--model-config PATH (its config.json, or the folder holding it), or download the model")
    labels = len(cfg.task.labels or []) or 4
    key = json.dumps([str(folder.resolve()), cfg.model.dtype, cfg.model.trust_remote_code,
                      cfg.method.model_dump(mode="json") if method else None, labels], sort_keys=True)
    return _shape(key)


@lru_cache(maxsize=64)
def _shape(key: str) -> ModelShape:
    from lorafleet.base_model import model_skeleton
    from lorafleet.train.methods import decoder_layers
    from lorafleet.train.steps import build_model

    folder, dtype, trust, method, labels = json.loads(key)
    if method is None or method["name"] == "feature":
        model = model_skeleton(folder, dtype, trust)
    else:
        model_cfg = {"name_or_path": folder, "dtype": dtype, "trust_remote_code": trust}
        cfg = FinetuneConfig.model_validate({"model": model_cfg, "method": method})
        model = build_model(cfg, labels, skeleton=True)
    base = getattr(model, "base", model)  # a HeadClassifier's causal LM
    c = base.config
    if getattr(c, "tie_word_embeddings", False):  # the skeleton's embeddings come untied (SmolLM2 ties them)
        lm = base.get_base_model() if hasattr(base, "get_base_model") else base
        lm.tie_weights()
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    params = dict(model.named_parameters())  # tied weights once
    tensors = tuple((p.shape[0] if p.dim() else 0, p.numel(), p.requires_grad) for p in params.values())
    blocks = [[(p.numel(), p.requires_grad) for p in b.parameters()] for b in decoder_layers(base)]
    block = max(((sum(n for n, _ in b), sum(n for n, t in b if t)) for b in blocks), default=(0, 0))
    in_blocks = (sum(n for b in blocks for n, _ in b), sum(n for b in blocks for n, t in b if t))
    total = (sum(n for _, n, _ in tensors), sum(n for _, n, t in tensors if t))
    return ModelShape(name=Path(folder).name, hidden=c.hidden_size, layers=c.num_hidden_layers,
                      intermediate=getattr(c, "intermediate_size", 4 * c.hidden_size), kv=kv * head_dim,
                      vocab=c.vocab_size, tensors=tensors, block=block,
                      root=(total[0] - in_blocks[0], total[1] - in_blocks[1]))


@dataclass
class Part:
    name: str
    bytes: int
    formula: str
    counted: bool = True  # in the total (False: shown for comparison)
    host: bool = False  # held in host memory, not on the device


def device_bytes(parts: list[Part]) -> int:
    """The bytes the device holds: the counted parts that are not in host memory."""
    return sum(p.bytes for p in parts if p.counted and not p.host)


def with_sets(cfg: FinetuneConfig, sets: list[str]) -> FinetuneConfig:
    """`cfg` with dotted ``key=value`` changes, validated."""
    return FinetuneConfig.model_validate(apply_overrides(cfg.model_dump(mode="json"), sets))


def _act_per_token_layer(shape: ModelShape, c: int) -> int:
    return c * (11 * shape.hidden + 2 * shape.kv + 4 * shape.intermediate)


def _compute_bytes(dtype: str, on_gpu: bool) -> int:
    return 2 if on_gpu else (4 if dtype == "float32" else DTYPE_BYTES[dtype])


def training_parts(cfg: FinetuneConfig, shape: ModelShape, on_gpu: bool) -> list[Part]:
    """Memory per rank of training `cfg` (the module docstring has the formulas)."""
    s, m = cfg.scaling, cfg.method.name
    ranks = s.num_workers if s.strategy == "fsdp" else 1
    d, c = DTYPE_BYTES[cfg.model.dtype], _compute_bytes(cfg.model.dtype, on_gpu)
    frozen, trainable = shape.rank_share(ranks)
    share = f" / {ranks} ranks" if ranks > 1 else ""
    off = s.cpu_offload
    weights = Part("weights", frozen * d + trainable * 4, f"frozen {frozen:,} x {d} B + trainable {trainable:,} x 4 B{share}",
                   host=off)
    if m == "lora" and cfg.method.lora.quantize == "nf4":
        weights = _nf4_weights(shape)
    parts = [
        weights,
        Part("gradients", trainable * 4, f"trainable x 4 B (fp32){share}", host=off),
        Part("optimizer state", trainable * 8 + shape.trainable_tensors * 4, f"AdamW: trainable x 8 B + 4 B x "
             f"{shape.trainable_tensors} tensors{share}", host=off),
    ]
    if s.strategy == "fsdp":
        (rp, rt), (bp, bt) = shape.root, shape.block
        parts.append(Part("fsdp gathered", c * (rp + 2 * bp) + (c + 4) * (rt + bt),
                          f"root {rp:,} + 2 blocks x {bp:,} params x {c} B, their gradients x {c + 4} B"))
    elif s.num_workers > 1:
        parts.append(Part("ddp buckets", shape.trainable * 4, "trainable x 4 B (the all-reduced gradient copy)"))
    tokens = cfg.train.batch_size * cfg.data.max_seq_len
    a = _act_per_token_layer(shape, c)
    L, h = shape.layers, shape.hidden
    grad_layers = {"partial": min(cfg.method.partial_layers, L), "head": 0}.get(m, L)
    ck = cfg.train.grad_checkpointing
    if m == "head":  # the base runs without gradients and returns every layer's hidden state
        parts.append(Part("activations", (L + 1) * tokens * h * c + tokens * a,
                          f"{L + 1} hidden states x {tokens} tokens x {h} x {c} B + one block: {tokens} x {a:,} B"))
        parts.append(Part("logits", tokens * shape.vocab * c, f"{tokens} tokens x {shape.vocab:,} x {c} B"))
    else:
        parts.append(Part("activations, checkpointed", grad_layers * tokens * h * c + tokens * a,
                          f"{grad_layers} layers x {tokens} tokens x {h} x {c} B + one block: {tokens} x {a:,} B",
                          counted=ck))
        parts.append(Part("activations, not checkpointed", max(grad_layers, 1) * tokens * a,
                          f"{max(grad_layers, 1)} layers x {tokens} tokens x {a:,} B (c x (11h + 2kv + 4i))",
                          counted=not ck))
        parts.append(Part("logits and loss", tokens * shape.vocab * 12, f"{tokens} tokens x {shape.vocab:,} x 12 B"))
    if on_gpu:
        parts.append(Part("runtime", RUNTIME_BYTES, "CUDA context, cuBLAS and NCCL workspaces"))
    return parts


def _nf4_weights(shape: ModelShape) -> Part:
    """QLoRA's weights (one rank: it trains under DDP): the frozen decoder blocks as NF4 (4 bits a weight plus
    one fp32 absmax per block of 64: 0.5625 B; their norms too, a rounding error), the rest of the frozen base
    in fp32 (peft's prepare_model_for_kbit_training upcasts it), the adapter in fp32."""
    frozen_root = shape.root[0] - shape.root[1]
    frozen_blocks = (shape.params - shape.root[0]) - (shape.trainable - shape.root[1])
    return Part("weights", int(frozen_blocks * NF4_BYTES) + frozen_root * 4 + shape.trainable * 4,
                f"frozen blocks {frozen_blocks:,} x {NF4_BYTES} B (NF4) + frozen rest {frozen_root:,} x 4 B + "
                f"trainable {shape.trainable:,} x 4 B")


def inference_parts(cfg: FinetuneConfig, shape: ModelShape, on_gpu: bool) -> list[Part]:
    """One process scoring or prompting the base (the ladder's prompt and feature rungs): one sequence at a time."""
    d, c = DTYPE_BYTES[cfg.model.dtype], _compute_bytes(cfg.model.dtype, on_gpu)
    tokens, a = cfg.data.max_seq_len, _act_per_token_layer(shape, c)
    parts = [Part("weights", shape.params * d, f"{shape.params:,} x {d} B"),
             Part("activations", tokens * a, f"one block: {tokens} tokens x {a:,} B"),
             Part("logits", tokens * shape.vocab * 4, f"{tokens} tokens x {shape.vocab:,} x 4 B")]
    return parts + ([Part("runtime", RUNTIME_BYTES, "CUDA context and workspaces")] if on_gpu else [])
