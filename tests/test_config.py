"""Config: every shipped YAML loads; problems are reported all at once, with the fix."""

from pathlib import Path

import pytest
import yaml

from helpers import REPO
from lorafleet.config import ConfigError, FinetuneConfig, apply_overrides, load_config, parse_config

TRAIN_CONFIGS = sorted(
    p for p in (REPO / "configs").rglob("*.yaml")
    if "name" in (yaml.safe_load(p.read_text()) or {}) and "method" in (yaml.safe_load(p.read_text()) or {})
)


def test_train_configs_exist_for_every_task():
    names = {p.name for p in TRAIN_CONFIGS}
    for task in ("classification", "summarization", "translation", "qa"):
        assert f"{task}-lora.yaml" in names


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_train_config_loads(path: Path, tmp_path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# lorafleet train "), "each config begins with the command that runs it"
    cfg = load_config(path, home=tmp_path)
    assert isinstance(cfg, FinetuneConfig)
    assert "${home}" not in cfg.model.name_or_path


def test_all_problems_reported_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: ok\nmethod: {name: lorra}\ntrain: {lr: -1, max_steps: 0, lr_typo: 3}\nscaling: {num_workers: 0}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(bad, home=tmp_path)
    msg = str(err.value)
    assert len(err.value.problems) == 5, msg
    for needle in ("method.name", "train.lr", "train.max_steps", "train.lr_typo: unknown key", "scaling.num_workers"):
        assert needle in msg


def test_cross_field_problems_say_the_fix(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse_config({"name": "a/b", "task": {"name": "translation"}, "method": {"name": "head"},
                      "scaling": {"strategy": "fsdp"}}, home=tmp_path)
    msg = str(err.value)
    assert "use letters, digits" in msg
    assert "method 'head' needs task 'classification'" in msg
    assert "use 'ddp'" in msg
    assert len(err.value.problems) == 3


def test_dotted_overrides_parse_yaml_scalars():
    raw = apply_overrides({"train": {"lr": 1.0}}, ["train.lr=3e-4", "method.lora.r=4", "scaling.use_gpu=true",
                                                     "method.lora.target_modules=[q_proj, v_proj]"])
    assert raw["train"]["lr"] == pytest.approx(3e-4)
    assert raw["method"]["lora"] == {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    assert raw["scaling"]["use_gpu"] is True
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["train.lr"])


def test_home_and_paths_resolved(tmp_path):
    cfg = parse_config({"data": {"train": "./data/x.jsonl"}}, home=tmp_path)
    assert cfg.model.name_or_path == str(tmp_path / "models" / "tiny")
    assert cfg.run.storage_path == str(tmp_path / "runs")
    assert Path(cfg.data.train).is_absolute()
    assert cfg.data.validation == "synthetic"
    hub = parse_config({"model": {"name_or_path": "meta-llama/Llama-3.2-1B"}}, home=tmp_path)
    assert hub.model.name_or_path == "meta-llama/Llama-3.2-1B"  # hub ids pass through untouched
