"""Sequence packing (data.packing): rows placed best-fit decreasing into max_seq_len blocks, and the loss
of a packed batch equal, token for token, to the rows' own losses when each runs alone (tiny model, fp32)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from lorafleet.base_model import load_model, load_tokenizer
from lorafleet.config import ConfigError
from lorafleet.config.finetune import parse_config
from lorafleet.data import IGNORE_INDEX, encode_rows, read_split
from lorafleet.tasks import get_task
from lorafleet.train.dataset import collate
from lorafleet.train.packing import flash_kwargs, model_inputs, pack_rows, packed_blocks

DATA = Path(__file__).parent / "data"
MAX_LEN = 160


def test_best_fit_decreasing_places_every_row_once():
    # lengths by index: 5, 3, 4, 2, 6; worked by hand: 6 -> new block (room 2), 5 -> new (room 3), 4 -> new
    # (room 4), 3 -> the block with room 3 (the fullest that holds it), 2 -> the block with room 2
    assert pack_rows([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
    assert pack_rows([8, 8], 8) == [[0], [1]]
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([9], 8)


def test_packed_block_restarts_positions_and_drops_the_cross_row_label():
    rows = [{"input_ids": [11, 12, 13], "labels": [IGNORE_INDEX, 12, 13]}, {"input_ids": [21, 22], "labels": [21, 22]}]
    (block,) = packed_blocks(rows, 8, pad_id=0)
    assert block["input_ids"].tolist() == [11, 12, 13, 21, 22, 0, 0, 0]
    assert block["position_ids"].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert block["attention_mask"].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    # row 2's first token (21) would be predicted from row 1's last: no loss there
    assert block["labels"].tolist() == [IGNORE_INDEX, 12, 13, IGNORE_INDEX, 22] + [IGNORE_INDEX] * 3
    kw = flash_kwargs(torch.as_tensor(block["position_ids"])[None])
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 5, 8] and kw["max_length_q"] == 3


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy of the tokens that carry a label (causal shift), in order."""
    logits, labels = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    keep = labels != IGNORE_INDEX
    return torch.nn.functional.cross_entropy(logits[keep].float(), labels[keep], reduction="none")


@pytest.fixture(scope="module")
def rows(base_model):
    """Variable-length rows: chat rows (loss on every assistant turn) and summarization rows."""
    tok = load_tokenizer(str(base_model))
    chat = read_split(str(DATA / "chat.jsonl"), get_task("instruction"), "train")
    summ = read_split("synthetic", get_task("summarization"), "train", synthetic_n=6)
    encoded = encode_rows(tok, get_task("instruction"), chat, MAX_LEN)
    encoded += encode_rows(tok, get_task("summarization"), summ, MAX_LEN)
    return encoded, tok.pad_token_id


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flat"])
def test_packed_loss_equals_the_rows_own_loss(base_model, rows, attn):
    """sdpa: the 4D boolean block mask; eager: the additive one; flat: the batch flattened to one sequence
    with position_ids and FlashAttention's cu_seq_lens (the flash_attention_2 layout), here through sdpa,
    which finds the rows from the restarting position_ids (transformers' padding-free path)."""
    encoded, pad_id = rows
    model = load_model(str(base_model), "float32", attn_implementation="eager" if attn == "eager" else "sdpa").eval()
    with torch.no_grad():
        alone = [_token_losses(model(input_ids=torch.tensor([r["input_ids"]])).logits, torch.tensor([r["labels"]]))
                 for r in encoded]
        blocks = packed_blocks(encoded, MAX_LEN, pad_id)
        batch = collate({k: np.stack([b[k] for b in blocks]) for k in blocks[0]})
        assert batch["input_ids"].shape[0] < len(encoded)  # several rows share a block
        inputs = model_inputs(batch, torch.device("cpu"), "flash_attention_2" if attn == "flat" else attn)
        out = model(**inputs)
    packed = _token_losses(out.logits, inputs["labels"])
    # the same tokens in block order: each block's rows in the order pack_rows placed them
    order = [i for block in pack_rows([len(r["input_ids"]) for r in encoded], MAX_LEN) for i in block]
    expected = torch.cat([alone[i] for i in order])
    assert packed.shape == expected.shape and len(expected) > 80
    torch.testing.assert_close(packed, expected, rtol=0, atol=1e-5)
    # the model's own loss: the mean over every answer token of every row
    assert abs(float(out.loss) - float(expected.mean())) < 1e-5


def test_packing_applies_to_generative_methods_only(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse_config({"task": {"name": "classification"}, "method": {"name": "head"}, "data": {"packing": True}},
                     home=tmp_path)
    assert "data.packing" in str(err.value) and "'head'" in str(err.value)
    with pytest.raises(ConfigError, match="flash_attention_2' needs scaling.use_gpu"):
        parse_config({"model": {"attn_implementation": "flash_attention_2"}}, home=tmp_path)
    cfg = parse_config({"task": {"name": "qa"}, "data": {"packing": True}}, home=tmp_path)
    assert cfg.data.packing


def test_too_few_blocks_for_one_step_is_a_data_error(rows, tmp_path):
    from lorafleet.data import DataError
    from lorafleet.train.dataset import build_dataset

    encoded, pad_id = rows
    cfg = parse_config({"task": {"name": "instruction"}, "data": {"packing": True, "max_seq_len": MAX_LEN},
                        "train": {"batch_size": 4}, "scaling": {"num_workers": 2}}, home=tmp_path)
    n_blocks = len(pack_rows([len(r["input_ids"]) for r in encoded], MAX_LEN))
    assert n_blocks < 8 <= len(encoded)  # enough rows for a padded step, too few blocks for a packed one
    with pytest.raises(DataError, match=rf"{len(encoded)} rows packed into {n_blocks} blocks of data.max_seq_len={MAX_LEN} "
                       r"tokens: fewer than one optimizer step takes \(.* = 8\); lower train.batch_size or data.max_seq_len"):
        build_dataset(encoded, pad_id, cfg)


def test_lora_optimizer_steps_train_on_packed_batches(base_model, rows, tmp_path):
    """The worker's step loop (train.steps) on packed batches: the peft-wrapped model's attention is found,
    the loss falls on a batch seen again, and the tokens counted are the rows' (not the blocks' padding)."""
    from lorafleet.train.dataset import build_scheduler
    from lorafleet.train.precision import training_precision
    from lorafleet.train.steps import build_model, optimizer_steps

    encoded, pad_id = rows[0][:6], rows[1]  # the chat rows: two blocks, enough for a step and cheap
    cfg = parse_config({"model": {"name_or_path": str(base_model)}, "task": {"name": "instruction"},
                        "data": {"packing": True, "max_seq_len": MAX_LEN},
                        "train": {"lr": 1e-2, "warmup_steps": 0, "max_steps": 3, "schedule": "constant"}}, home=tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg, None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
    blocks = packed_blocks(encoded, MAX_LEN, pad_id)
    batch = collate({k: np.stack([b[k] for b in blocks]) for k in blocks[0]})
    steps = list(optimizer_steps(model, [batch] * 3, cfg, device=torch.device("cpu"), optimizer=optimizer,
                                 scheduler=build_scheduler(optimizer, cfg), params=params,
                                 precision=training_precision("float32", torch.device("cpu"))))
    losses = [float(loss) for loss, _ in steps]
    assert losses[-1] < losses[0] - 0.1, losses
    assert {tokens for _, tokens in steps} == {sum(len(r["input_ids"]) for r in encoded)}
