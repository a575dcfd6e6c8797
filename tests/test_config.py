import dataclasses

import pytest

from layerprune.cli import build_parser, config_from_args
from layerprune.config import CompareConfig, EvalConfig, HealConfig, PruneConfig, ScoreConfig
from layerprune.errors import LayerpruneError


def parse(*argv):
    args = build_parser().parse_args(list(argv))
    return config_from_args(args.config_class, args)


class TestFlags:
    def test_every_field_of_every_command_has_a_flag(self):
        def paths(obj, prefix=""):
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                yield from paths(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]

        parser = build_parser()
        for command, cls in (("prune", PruneConfig), ("score", ScoreConfig), ("eval", EvalConfig),
                             ("compare", CompareConfig)):
            sub = parser._subparsers._group_actions[0].choices[command]
            dests = {a.dest for a in sub._actions}
            assert {f"config:{p}" for p in paths(cls())} <= dests, command

    def test_defaults_come_from_the_dataclasses(self):
        assert parse("prune", "--out", "o", "--remove", "1") == PruneConfig(out="o", remove=1)
        assert parse("score") == ScoreConfig() and parse("eval") == EvalConfig()
        assert parse("compare", "--out", "c") == CompareConfig(out="c")

    def test_flags_override_yaml_which_overrides_defaults(self, tmp_path):
        path = tmp_path / "run.yaml"
        path.write_text("out: from-yaml\nremove: 3\nmetric: bi\ndata:\n  seq_len: 64\nheal:\n  steps: 7\n  lr: 0.002\n")
        config = parse("prune", "--config", str(path), "--heal-steps", "9", "--no-speed")
        assert (config.out, config.remove, config.metric) == ("from-yaml", 3, "bi")
        assert config.data.seq_len == 64 and config.heal.steps == 9 and config.heal.lr == 0.002
        assert config.measure_speed is False and config.heal.batch_size == HealConfig().batch_size

    def test_bad_yaml_is_one_error(self, tmp_path):
        path = tmp_path / "run.yaml"
        path.write_text("- a list\n")
        with pytest.raises(LayerpruneError, match="does not hold a mapping"):
            parse("prune", "--config", str(path))
        with pytest.raises(LayerpruneError, match="cannot read config file"):
            parse("prune", "--config", str(tmp_path / "none.yaml"))


class TestValidate:
    def test_protected_layers_bound_what_may_go(self):
        config = PruneConfig(out="o", target_layers=4, protect_first=1)
        assert config.most_removable(6) == 5 and config.removable(6) == [1, 2, 3, 4, 5]
        assert PruneConfig(out="o", remove=1, protect_first=3, protect_last=2).most_removable(6) == 1

    def test_compare_counts_and_methods(self):
        with pytest.raises(LayerpruneError, match="unknown method"):
            CompareConfig(out="c", methods=("magic",)).validate()
        with pytest.raises(LayerpruneError, match="must be positive"):
            CompareConfig(out="c", counts=(0,)).validate()
