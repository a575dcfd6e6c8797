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


class TestIgnored:
    def test_options_a_configuration_never_reads_are_named_with_what_they_need(self):
        config = parse("prune", "--out", "o", "--remove", "1", "--metric", "bi", "--screen", "2", "--patch", "none",
                       "--patch-fit", "cosine", "--heal", "none", "--heal-steps", "60", "--lora-r", "8")
        lines = config.ignored()
        assert "--screen has no effect here: it applies with --metric nll or quality outside --mode block" in lines
        assert "--patch-fit has no effect here: it applies with --patch lstsq or diag" in lines
        assert "--heal-steps has no effect here: it applies with --heal distill" in lines
        assert "--lora-r has no effect here: it applies with --heal distill" in lines   # the first reason only
        assert len(lines) == 4

    def test_defaults_and_options_that_count_are_not_named(self):
        assert PruneConfig(out="o", remove=1).ignored() == []
        lora = parse("prune", "--out", "o", "--remove", "1", "--trainable", "lora", "--lora-r", "8", "--radius", "3")
        assert lora.ignored() == ["--radius has no effect here: it applies with --trainable neighbours"]
        assert parse("prune", "--out", "o", "--remove", "1", "--screen", "2", "--heal-steps", "9").ignored() == []

    def test_a_run_logs_them_before_anything_else(self, tmp_path, caplog):
        from layerprune.pipeline import prune

        (tmp_path / "a-file").write_text("mine")
        config = parse("prune", "--out", str(tmp_path / "a-file"), "--remove", "1", "--heal", "none",
                       "--heal-lr", "0.1")
        with pytest.raises(LayerpruneError, match="is a file"):
            prune(config, progress=False)
        assert "--heal-lr has no effect here: it applies with --heal distill" in caplog.text
