from __future__ import annotations

import pytest
import yaml

from libkd.cli import main
from libkd.config import ConfigError, ExperimentConfig, load_config, save_config


def test_defaults_load_without_a_file():
    cfg = load_config()
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.data.source == "digits"


def test_yaml_file_then_overrides_win(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("seed: 3\ndata:\n  source: synthetic\n  subset: 0.5\n")
    cfg = load_config(path, ["data.subset=10", "seed=7", "data.synthetic.num_classes=5", "data.skip_corrupt=true"])
    assert cfg.seed == 7
    assert cfg.data.source == "synthetic"
    assert cfg.data.subset == 10 and isinstance(cfg.data.subset, int)
    assert cfg.data.synthetic.num_classes == 5
    assert cfg.data.skip_corrupt is True


def test_override_values_are_parsed_as_yaml():
    cfg = load_config(None, ["data.subset=0.1", "data.cache_dir=/tmp/x"])
    assert cfg.data.subset == pytest.approx(0.1)
    assert cfg.data.cache_dir == "/tmp/x"


def test_unknown_key_names_the_valid_keys_and_a_suggestion():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.subest=0.1"])
    msg = str(err.value)
    assert "data.subest" in msg and "did you mean 'subset'" in msg
    assert "skip_corrupt" in msg and "source" in msg


def test_unknown_top_level_key_in_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("sed: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'sed'.*did you mean 'seed'"):
        load_config(path)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="'seed'.*integer"):
        load_config(None, ["seed=abc"])
    with pytest.raises(ConfigError, match="'data.source'"):
        load_config(None, ["data.source=mnist"])


def test_section_given_a_scalar():
    with pytest.raises(ConfigError, match="'data' is a section"):
        load_config(None, ["data=3"])


def test_missing_file_bad_yaml_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["seed"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["seed=5", "data.subset=0.25"])
    path = save_config(cfg, tmp_path / "run")
    assert yaml.safe_load(path.read_text())["data"]["subset"] == 0.25
    assert load_config(path) == cfg


def test_cli_reports_config_errors_without_traceback(capsys):
    assert main(["data", "info", "synthetic", "--set", "data.bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'data.bogus'" in err and "Traceback" not in err


def test_cli_shortcut_options_become_overrides(capsys):
    assert main(["data", "info", "synthetic", "--seed", "4", "--json", "--set", "data.synthetic.per_class=3"]) == 0
    out = capsys.readouterr().out
    assert '"images": 12' in out


def test_the_defaults_are_the_recipe_that_works_and_deits_is_one_set_away():
    cfg = load_config()
    # the searched student recipe: alpha 0.9 at tau 3, RandAugment m5, Mixup 0.2, no CutMix, one view per epoch
    assert (cfg.distill.alpha, cfg.distill.tau) == (0.9, 3.0)
    assert cfg.replay.auto_augment == "rand-m5-mstd0.5-inc1"
    assert (cfg.replay.mixup_alpha, cfg.replay.cutmix_alpha, cfg.replay.erase_prob) == (0.2, 0.0, 0.25)
    assert cfg.store.views == cfg.train.epochs
    deit = load_config(None, ["distill.alpha=0.5", "distill.tau=1", "replay.auto_augment=rand-m9-mstd0.5-inc1",
                              "replay.mixup_alpha=0.8", "replay.cutmix_alpha=1.0", "store.views=4"])
    assert (deit.distill.alpha, deit.distill.tau, deit.replay.mixup_alpha, deit.replay.cutmix_alpha) == (0.5, 1.0, 0.8, 1.0)
    assert deit.store.views == 4


def test_views_follow_the_epochs_unless_set(tmp_path):
    assert load_config(None, ["train.epochs=37"]).store.views == 37
    assert load_config(None, ["train.epochs=37", "store.views=5"]).store.views == 5
    # a resolved config given other epochs follows them: the filled-in views are not taken as set
    from libkd.study.plan import with_overrides

    cfg = load_config(None, ["train.epochs=300"])
    assert with_overrides(cfg, {"train.epochs": 12}).store.views == 12
    assert with_overrides(load_config(None, ["store.views=8"]), {"train.epochs": 12}).store.views == 8
    # and a saved config reloads with the views it ran with
    path = save_config(with_overrides(cfg, {"train.epochs": 12}), tmp_path)
    assert load_config(path).store.views == 12
    with pytest.raises(ConfigError, match="first_view"):
        load_config(None, ["train.epochs=3", "store.first_view=3"])


def test_describe_data_names_the_subset_only_when_there_is_one():
    from libkd.config import describe_data

    assert describe_data({"source": "imagefolder", "root": "/data/pets", "subset": None}) == "imagefolder /data/pets"
    assert describe_data({"source": "cifar10", "root": "../c10", "subset": 0.1}) == "cifar10 ../c10 (subset 0.1)"
    assert describe_data({"source": "digits", "root": None, "subset": 100}) == "digits (subset 100)"
