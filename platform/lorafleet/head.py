"""The classification head model (method `head`): a linear layer on a frozen causal LM's last-token
hidden state. Training builds it (`train.methods`), scoring loads it (`evaluate`), so it lives below both.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["HeadClassifier", "freeze", "last_token_hidden"]


def freeze(model: nn.Module) -> None:
    """Make every parameter of `model` frozen."""
    for p in model.parameters():
        p.requires_grad_(False)


def last_token_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden state at each row's last real token (right padding)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    last = attention_mask.sum(dim=1) - 1
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last]


class HeadClassifier(nn.Module):
    """A linear classification head on a frozen causal LM's last-token hidden state."""

    def __init__(self, base: nn.Module, num_labels: int):
        super().__init__()
        self.base = base
        freeze(self.base)
        self.head = nn.Linear(base.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = last_token_hidden(self.base, input_ids, attention_mask)
        # The head keeps fp32 weights on a bf16/fp16 base: feed it features in its own dtype (under
        # autocast the matmul still runs in the compute dtype).
        return self.head(features.to(self.head.weight.dtype))
