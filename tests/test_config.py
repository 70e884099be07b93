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


def test_generation_budget_and_truncation_settings(tmp_path):
    """task.max_new_tokens (generating tasks only, >= 1; default: none, the task's own) and
    data.truncate (error | left | right; default error)."""
    cfg = parse_config({"task": {"name": "summarization", "max_new_tokens": 128}, "data": {"truncate": "left"}},
                       home=tmp_path)
    assert (cfg.task.max_new_tokens, cfg.data.truncate) == (128, "left")
    default = parse_config({"task": {"name": "qa"}}, home=tmp_path)
    assert (default.task.max_new_tokens, default.data.truncate) == (None, "error")
    with pytest.raises(ConfigError) as err:
        parse_config({"task": {"name": "classification", "max_new_tokens": 8}, "data": {"truncate": "middle"}},
                     home=tmp_path)
    assert "task.max_new_tokens does not apply to task 'classification'" in str(err.value)
    assert "data.truncate: Input should be 'error', 'left' or 'right'" in str(err.value)
    for bad in ({"name": "text", "max_new_tokens": 8}, {"name": "qa", "max_new_tokens": 0}):
        with pytest.raises(ConfigError, match="task.max_new_tokens"):
            parse_config({"task": bad}, home=tmp_path)


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


# --- every shipped config loads through its own schema --------------------------------------------

def _config_kind(raw: dict) -> str:
    """Which loader a shipped YAML is for, from its top-level keys (None: no lorafleet config)."""
    if "applications" in raw:
        return "serve"
    if "train_config" in raw:
        return "sweep"
    if "rungs" in raw or "base" in raw:
        return "compare"
    if "method" in raw or "model" in raw:
        return "train"
    return "unknown"


# configs/k8s/ holds Kubernetes manifests, checked against their schemas by tests/test_k8s.py.
SHIPPED_CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "k8s" not in p.relative_to(REPO).parts)


def load_shipped(path: Path, home: Path):
    """Load one shipped config with the loader its kind uses at run time (all problems at once)."""
    from lorafleet.config.compare import load_compare_config
    from lorafleet.config.serve import load_settings
    from lorafleet.sweep.spec import load_sweep

    kind = _config_kind(yaml.safe_load(path.read_text()) or {})
    loaders = {"train": lambda: load_config(path, home=home), "sweep": lambda: load_sweep(path, home=home, name="t"),
               "serve": lambda: load_settings(path), "compare": lambda: load_compare_config(path, home=home)}
    assert kind in loaders, f"{path}: not a train, sweep, serve or compare config (top-level keys?)"
    return kind, loaders[kind]()


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads_with_its_schema(path: Path, tmp_path):
    kind, loaded = load_shipped(path, tmp_path)
    assert loaded is not None, kind


def test_gpu_presets_are_8b_lora_bf16_checkpointed_on_4_gpu_workers(tmp_path):
    """The configs/gpu presets say what issue 21 asks of them, through the real loaders: the training
    config itself, every sweep trial (training config + the sweep's overrides and resources), and
    the serve application."""
    from lorafleet.config.serve import load_settings
    from lorafleet.sweep.spec import example_params, load_sweep, trial_config

    gpu = REPO / "configs" / "gpu"
    train = load_config(gpu / "classification-lora-8b.yaml", home=tmp_path)
    spec = load_sweep(gpu / "sweep-classification-8b.yaml", home=tmp_path, name="t")
    trial = trial_config(spec, example_params(spec), "t0")
    for cfg in (train, trial):
        assert "8B" in cfg.model.name_or_path and cfg.model.dtype == "bfloat16"
        assert cfg.method.name == "lora" and cfg.train.grad_checkpointing
        assert (cfg.scaling.num_workers, cfg.scaling.use_gpu) == (4, True)
    assert trial.method.lora.alpha == 2 * trial.method.lora.r
    serve = load_settings(gpu / "serve-8b.yaml")
    assert serve.base_model == train.model.name_or_path  # adapters are served on the base they trained on
    assert (serve.accelerator, serve.dtype) == ("gpu", "bfloat16")
    assert serve.max_lora_rank >= max(spec.sweep.space["method.lora.r"].choice)
    assert set(serve.tasks.values()) == {train.name, spec.sweep.registry.name}
