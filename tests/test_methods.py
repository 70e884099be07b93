"""The method ladder decides what is trainable; counts are checked against the architecture."""

import pytest
import torch

from lorafleet.base_model import load_model
from lorafleet.config import MethodConfig
from lorafleet.head import HeadClassifier
from lorafleet.train.methods import apply_method, count_params, decoder_layers


@pytest.fixture
def model(base_model):
    return load_model(str(base_model))


def test_full_trains_everything(model):
    trainable, total = count_params(apply_method(model, MethodConfig(name="full")))
    assert trainable == total > 1_000_000


def test_partial_trains_last_layers_norm_and_output(model):
    h, v = model.config.hidden_size, model.config.vocab_size
    per_layer = sum(p.numel() for p in decoder_layers(model)[-1].parameters())
    m = apply_method(model, MethodConfig(name="partial", partial_layers=2))
    trainable, _ = count_params(m)
    assert trainable == 2 * per_layer + h * v + h  # 2 blocks + lm_head (untied) + final norm
    assert not m.get_input_embeddings().weight.requires_grad
    assert not decoder_layers(m)[0].self_attn.q_proj.weight.requires_grad


def test_lora_counts_match_rank(model):
    cfg = MethodConfig(name="lora", lora={"r": 8, "target_modules": ["q_proj", "v_proj"]})
    m = apply_method(model, cfg)
    trainable, total = count_params(m)
    h = model.config.hidden_size
    n_layers = model.config.num_hidden_layers
    assert trainable == n_layers * 2 * 8 * (h + h)  # A (r x in) + B (out x r) for q and v
    assert trainable / total < 0.05


def test_head_trains_only_the_head(model):
    m = apply_method(model, MethodConfig(name="head"), num_labels=4)
    assert isinstance(m, HeadClassifier)
    trainable, _ = count_params(m)
    assert trainable == model.config.hidden_size * 4 + 4
    logits = m(torch.tensor([[5, 6, 7]]), torch.tensor([[1, 1, 1]]))
    assert logits.shape == (1, 4)
