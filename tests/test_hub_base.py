"""Serving a hub id as `base_model` (issue 19 §3): resolved through the local HF cache, never downloaded.

The cache is a real huggingface_hub cache layout (refs/main -> snapshots/<commit>/) in tmp_path that
holds the tiny base model; only the download itself cannot happen here (no hub access), so the test
exercises the cache lookup that serving does with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lorafleet.config import ConfigError
from lorafleet.config.serve import ServeSettings

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(monkeypatch, tmp_path, base_model) -> Path:
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-llm"
    shutil.copytree(base_model, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return repo / "snapshots" / COMMIT


def test_hub_id_resolves_to_its_cached_snapshot(hf_cache, tmp_path):
    settings = ServeSettings(base_model="acme/tiny-llm", home=str(tmp_path / "home"))
    assert settings.require_base_model() == hf_cache.resolve()
    assert settings.base_model_path() == str(hf_cache)


def test_hub_id_not_in_cache_is_a_config_error_with_the_fix(hf_cache, tmp_path):
    settings = ServeSettings(base_model="acme/other-llm", home=str(tmp_path / "home"))
    with pytest.raises(ConfigError) as err:
        settings.require_base_model("serve.yaml")
    text = str(err.value)
    assert "serve.yaml" in text and "acme/other-llm" in text and "huggingface-cli download acme/other-llm" in text


def test_folder_wins_and_a_missing_folder_is_not_looked_up_as_a_hub_id(base_model, tmp_path):
    assert ServeSettings(base_model=str(base_model)).require_base_model() == Path(base_model).resolve()
    with pytest.raises(ConfigError, match="no folder with config.json"):
        ServeSettings(base_model=str(tmp_path / "nowhere")).require_base_model()
