"""The method ladder: what is trainable for full, partial, lora and head; feature trains no torch weights.

Each function takes a loaded causal LM and returns the module to train. Nothing here knows about Ray.
"""

from __future__ import annotations

from torch import nn

from lorafleet.config import MethodConfig
from lorafleet.head import HeadClassifier, freeze

__all__ = ["apply_method", "count_params", "decoder_layers"]


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of any HF causal LM (Llama, Mistral, Qwen, GPT-2 ...)."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"could not find the {n} decoder layers of {type(model).__name__}")


def apply_method(model: nn.Module, method: MethodConfig, num_labels: int | None = None) -> nn.Module:
    """Return the model to train for `method` with the right parameters trainable."""
    if method.name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method.name == "partial":
        freeze(model)
        layers = decoder_layers(model)
        if method.partial_layers > len(layers):
            raise ValueError(
                f"method.partial_layers={method.partial_layers} but the model has {len(layers)} layers"
            )
        trainable = list(layers[-method.partial_layers :]) + [model.get_output_embeddings()]
        norm = getattr(getattr(model, "model", model), "norm", None)  # final norm feeds the output layer
        if norm is not None:
            trainable.append(norm)
        for module in trainable:
            for p in module.parameters():
                p.requires_grad_(True)
        return model
    if method.name == "lora":
        from peft import LoraConfig, get_peft_model

        lora = method.lora
        peft_config = LoraConfig(
            task_type="CAUSAL_LM",
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            use_dora=lora.use_dora,
            use_rslora=lora.use_rslora,
        )
        return get_peft_model(model, peft_config)
    if method.name == "head":
        if not num_labels:
            raise ValueError("method 'head' needs the task's labels")
        return HeadClassifier(model, num_labels)
    raise ValueError(f"method {method.name!r} trains no torch weights (feature runs on the driver)")
