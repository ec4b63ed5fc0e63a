"""Every atlasformer YAML in configs/ loads into its dataclass; unknown keys and bad values are errors."""

from pathlib import Path

import pytest

from atlasformer.config import ConfigError, configs_root, load_config, parse_overrides
from atlasformer.finetune import FinetuneConfig
from atlasformer.model_zoo import CellTransformerConfig
from atlasformer.pretrain import PretrainConfig
from atlasformer.tokenization import TokenizerConfig

ROOT = configs_root()


def test_configs_root_is_the_repo_folder():
    assert (ROOT / "model").is_dir() and (ROOT / "pretrain").is_dir()


@pytest.mark.parametrize("path", sorted((ROOT / "model").glob("*.yaml")), ids=lambda p: p.stem)
def test_model_presets_build_a_config(path):
    cfg = load_config(PretrainConfig, overrides=[f"model={path.stem}"])
    arch = CellTransformerConfig(**cfg.model)
    assert arch.d_model % arch.n_heads == 0
    unknown = set(cfg.model) - set(CellTransformerConfig().to_dict())
    assert not unknown


@pytest.mark.parametrize("path", sorted((ROOT / "pretrain").glob("*.yaml")), ids=lambda p: p.stem)
def test_pretrain_configs_load(path):
    cfg = load_config(PretrainConfig, path)
    CellTransformerConfig(**cfg.model)  # architecture validates too


@pytest.mark.parametrize("path", sorted((ROOT / "finetune").rglob("*.yaml")), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_finetune_configs_load(path):
    assert isinstance(load_config(FinetuneConfig, path), FinetuneConfig)


@pytest.mark.parametrize("path", sorted((ROOT / "tokenize").glob("*.yaml")) if (ROOT / "tokenize").exists() else [],
                         ids=lambda p: p.stem)
def test_tokenize_configs_load(path):
    assert isinstance(load_config(TokenizerConfig, path), TokenizerConfig)


def test_overrides_apply_over_yaml_and_presets(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("model: tiny\nmax_steps: 10\ntokenizer:\n  n_bins: 21\n")
    cfg = load_config(PretrainConfig, yaml_file, ["max_steps=5", "model.d_model=64", "tokenizer.max_seq_len=128"])
    assert cfg.max_steps == 5 and cfg.model["d_model"] == 64 and cfg.model["n_layers"] == 2
    assert cfg.tokenizer.n_bins == 21 and cfg.tokenizer.max_seq_len == 128


@pytest.mark.parametrize(
    "override, message",
    [
        ("max_stepz=5", "unknown setting"),
        ("tokenizer.nbins=3", "unknown setting"),
        ("precision=fp64", "not one of"),
        ("max_steps=many", "expected int"),
        ("model=huge", "unknown model preset"),
        ("mask_ratio=1.5", "mask_ratio"),
    ],
)
def test_bad_settings_are_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, overrides=[override])


def test_override_syntax():
    assert parse_overrides(["a.b=1", "c=x", "d=[1, 2]"]) == {"a": {"b": 1}, "c": "x", "d": [1, 2]}
    with pytest.raises(ConfigError):
        parse_overrides(["novalue"])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config(PretrainConfig, Path("/nonexistent.yaml"))
