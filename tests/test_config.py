"""Strict configuration loading: every committed YAML loads, and bad input names its key."""

from pathlib import Path

import pytest

from iqpir import config as C

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_committed_configs_load(path):
    cfg = C.load(path)
    assert cfg.train.stage in (1, 2)
    assert C.from_dict(C.to_dict(cfg)) == cfg


def test_paper_defaults_match_the_paper():
    m = C.RunConfig().model
    assert (m.image_size, m.latent_size, m.latent_channels, m.codebook_size) == (512, 16, 256, 1024)
    assert (m.hq_threshold, m.alpha, m.beta) == (0.70, 0.8, 0.25)
    assert (m.transformer.layers, m.transformer.width, m.transformer.heads, m.transformer.mlp) == (9, 512, 8, 1024)
    t = C.RunConfig().train
    assert (t.feat_weight, t.index_weight, t.quality_weight) == (1.0, 0.5, 0.1)


def test_tiny_preset_overrides_and_keeps_the_rest():
    cfg = C.from_preset("tiny")
    assert cfg.model.image_size == 64 and cfg.model.latent_size == 16
    assert cfg.model.alpha == 0.8  # not overridden by the preset


def test_unknown_key_names_the_dotted_key_and_suggests():
    with pytest.raises(C.ConfigError, match=r"model\.alpah.*model\.alpha"):
        C.from_dict({"model": {"alpah": 1.0}})


def test_wrong_type_names_the_key():
    with pytest.raises(C.ConfigError, match=r"train\.steps"):
        C.from_dict({"train": {"steps": "many"}})
    with pytest.raises(C.ConfigError, match=r"train\.steps"):
        C.from_dict({"train": {"steps": 1.5}})
    with pytest.raises(C.ConfigError, match=r"model\.dual_codebook"):
        C.from_dict({"model": {"dual_codebook": 1}})
    with pytest.raises(C.ConfigError, match=r"model\.quality_embedding"):
        C.from_dict({"model": {"quality_embedding": "learned"}})
    with pytest.raises(C.ConfigError, match=r"model\.channel_mult\[1\]"):
        C.from_dict({"model": {"channel_mult": [1, "two"]}})


def test_int_is_accepted_for_float():
    assert C.from_dict({"model": {"alpha": 1}}).model.alpha == 1.0


def test_duplicated_key_is_an_error(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("train:\n  lr: 1.0e-4\n  lr: 2.0e-4\n")
    with pytest.raises(C.ConfigError, match="duplicated key 'lr'"):
        C.load(f)


def test_dotted_overrides_apply_and_are_checked(tmp_path):
    cfg = C.load(preset="tiny", overrides=["train.lr=0.001", "model.transformer.layers=3", "iqa.metrics=[niqe]"])
    assert cfg.train.lr == 0.001 and cfg.model.transformer.layers == 3 and cfg.iqa.metrics == ["niqe"]
    with pytest.raises(C.ConfigError, match=r"model\.transformer\.layer\b"):
        C.load(preset="tiny", overrides=["model.transformer.layer=3"])
    with pytest.raises(C.ConfigError, match="expected section.key=value"):
        C.load(preset="tiny", overrides=["train.lr"])


def test_cross_field_rules():
    with pytest.raises(C.ConfigError, match="image_size"):
        C.from_dict({"model": {"image_size": 100}})
    with pytest.raises(C.ConfigError, match="unknown preset|preset"):
        C.from_dict({"preset": "huge"})


def test_yaml_round_trip():
    cfg = C.from_preset("tiny")
    assert C.from_dict(C.parse_yaml(C.to_yaml(cfg))) == cfg


def test_train_amp_of_earlier_runs_reads_as_precision():
    """Configs stored by earlier checkpoints and run folders say train.amp: they still load."""
    for amp, precision in (("off", "float32"), ("auto", "auto"), ("bf16", "bf16")):
        with pytest.warns(DeprecationWarning, match="train.precision"):
            assert C.from_dict({"train": {"amp": amp}}).train.precision == precision
    assert C.RunConfig().train.precision == "float32"  # reproducible on every machine unless asked
    with pytest.raises(C.ConfigError, match="train.precision"):
        C.from_dict({"train": {"precision": "fp16"}})


def test_the_default_model_preset_is_a_one_stage_unet():
    cfg = C.from_preset("default-model")
    assert (cfg.model.arch, cfg.model.unet, cfg.train.stage) == ("conditioned_unet", C.UNetConfig(), 1)
    assert C.from_dict(C.parse_yaml(C.to_yaml(cfg))) == cfg
    with pytest.raises(C.ConfigError, match="one stage"):
        C.load(preset="default-model", overrides=["train.stage=2"])
