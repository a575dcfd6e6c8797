import pytest
import yaml

from layerprune.config import DataConfig, HealConfig, PruneConfig
from layerprune.errors import LayerpruneError
from layerprune.options import from_dict, merge_values, to_dict, to_yaml


class TestDicts:
    def test_yaml_round_trip_is_exact(self):
        config = PruneConfig(out="o", remove=2, tasks=("kl",), heal=HealConfig(mse_layers=(1, 3), lr=1e-3),
                             data=DataConfig(seq_len=64))
        assert from_dict(PruneConfig, yaml.safe_load(to_yaml(config))) == config

    def test_values_are_coerced_and_unknown_keys_refused(self):
        config = from_dict(PruneConfig, {"out": "o", "remove": "2", "tasks": "kl,perplexity",
                                         "heal": {"lr": 1, "teacher_cache": "false"}})
        assert config.remove == 2 and config.tasks == ("kl", "perplexity")
        assert config.heal.lr == 1.0 and config.heal.teacher_cache is False
        with pytest.raises(LayerpruneError, match=r"unknown config key\(s\) \['stepz'\] in heal"):
            from_dict(PruneConfig, {"heal": {"stepz": 3}})
        with pytest.raises(LayerpruneError, match="heal.steps must be int"):
            from_dict(PruneConfig, {"heal": {"steps": 2.5}})
        with pytest.raises(LayerpruneError, match="must be bool"):
            from_dict(PruneConfig, {"measure_speed": "maybe"})

    def test_to_dict_is_plain(self):
        data = to_dict(PruneConfig(out="o", remove=1))
        assert data["tasks"] == ["perplexity", "token_accuracy"] and data["heal"]["mse_layers"] is None

    def test_merge_overrides_section_by_section(self):
        merged = merge_values({"a": 1, "heal": {"steps": 2, "lr": 3}}, {"heal": {"steps": 5}})
        assert merged == {"a": 1, "heal": {"steps": 5, "lr": 3}}
