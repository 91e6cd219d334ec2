"""Config loading, overrides and validation: every bad value names its key."""

from __future__ import annotations

import pathlib

import pytest

from autostructn2v_jax import config as config_lib
from autostructn2v_jax.errors import ConfigError, UserInputError

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.py"))


def _valid(**top):
    cfg = config_lib.base_config()
    cfg.input_dir, cfg.output_dir = "in", "out"
    for key, value in top.items():
        config_lib.set_value(cfg, key, value)
    return cfg


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_load_and_validate(path):
    cfg = config_lib.load_config(str(path))
    cfg.input_dir, cfg.output_dir = "in", "out"
    if cfg.run_stage2 and cfg.stage2.mask_source == "file":
        cfg.stage2.mask_file_path = "mask.npy"
    config_lib.validate_config(cfg)


def test_method_defaults():
    cfg = config_lib.base_config()
    s1, s2 = cfg.stage1, cfg.stage2
    # stage 1: the time-to-quality winner on CPU (docs/benchmarks.md), not the reference's 32/4/64/1e-4
    assert (s1.patch_size, s1.batch_size, s1.features, s1.num_layers) == (64, 16, 16, 2)
    assert (s1.learning_rate, s1.patches_per_image, s1.mask_percentage, s1.mask_center_size) == (1e-3, 100, 15.0, 1)
    assert s1.replacement_strategy == "local_mean" and s1.use_roi and s1.select_background
    # stage 2: the same, measured on x-correlated noise under its mask (the reference's 96 / 1e-5 under-trained)
    assert (s2.patch_size, s2.batch_size, s2.features) == (64, 16, 16)
    assert (s2.learning_rate, s2.mask_percentage, s2.patches_per_image) == (1e-3, 10.0, 200)
    assert not s2.use_roi and not s2.select_background and s2.mask_source == "extractor"
    assert (cfg.num_epochs, cfg.early_stopping_patience, cfg.random_seed) == (100, 10, 42)
    assert tuple(cfg.split_ratio) == (0.7, 0.15, 0.15)
    assert s2.extractor.center_size == 11 and s2.extractor.max_true_pixels == 121
    assert s2.extractor.max_center_size == 31 and s2.extractor.method == "deconvolved"


def test_overrides_parse_types():
    cfg = _valid()
    config_lib.apply_overrides(cfg, ["stage1.patch_size=128", "stage2.learning_rate=1e-3",
                                     "early_stopping=false", "split_ratio=(0.8,0.1,0.1)",
                                     "stage2.extractor.method=significance", "experiment_name=x y"])
    assert cfg.stage1.patch_size == 128 and cfg.stage2.learning_rate == 1e-3
    assert cfg.early_stopping is False and tuple(cfg.split_ratio) == (0.8, 0.1, 0.1)
    assert cfg.stage2.extractor.method == "significance" and cfg.experiment_name == "x y"


@pytest.mark.parametrize("override, key", [
    ("stage1.patch_size=30", "stage1.patch_size"),
    ("stage1.patch_size=0", "stage1.patch_size"),
    ("stage1.mask_center_size=2", "stage1.mask_center_size"),
    ("stage1.mask_percentage=0", "stage1.mask_percentage"),
    ("stage2.mask_percentage=80", "stage2.mask_percentage"),
    ("stage1.replacement_strategy=mode", "stage1.replacement_strategy"),
    ("stage1.learning_rate=-1", "stage1.learning_rate"),
    ("stage2.mask_source=magic", "stage2.mask_source"),
    ("split_ratio=(0.5,0.5,0.5)", "split_ratio"),
    ("num_epochs=0", "num_epochs"),
    ("stage2.extractor.center_size=10", "stage2.extractor.center_size"),
    ("stage1.roi_threshold=2.0", "stage1.roi_threshold"),
    ("output_dtype=uint7", "output_dtype"),
    ("posterior_mean=histogram", "posterior_mean"),
    ("posterior_mean=True", "posterior_mean"),
    ("stage2.warm_start=yes", "stage2.warm_start"),
    ("tta=True", "tta"),
])
def test_bad_values_name_their_key(override, key):
    cfg = _valid()
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_lib.apply_overrides(cfg, [override])
        config_lib.validate_config(cfg)


def test_unknown_key_and_wrong_type():
    cfg = _valid()
    with pytest.raises(ConfigError, match="stage1.patchsize"):
        config_lib.apply_overrides(cfg, ["stage1.patchsize=3"])
    with pytest.raises(ConfigError, match="stage1.patch_size"):
        config_lib.apply_overrides(cfg, ["stage1.patch_size=big"])


def test_mode_consistency():
    cfg = _valid(run_stage1=False, **{"stage2.mask_source": "stage1"})
    with pytest.raises(ConfigError, match="stage2.mask_source"):
        config_lib.validate_config(cfg)
    cfg = _valid(run_stage1=False, **{"stage2.mask_source": "file"})
    with pytest.raises(ConfigError, match="stage2.mask_file_path"):
        config_lib.validate_config(cfg)
    with pytest.raises(ConfigError, match="input_dir"):
        cfg = config_lib.base_config()
        config_lib.validate_config(cfg)


def test_warm_start_on_needs_stage1_with_the_same_network():
    cfg = _valid(**{"stage2.warm_start": "on", "stage2.features": 32})
    with pytest.raises(ConfigError, match=r"stage2\.warm_start.*features"):
        config_lib.validate_config(cfg)
    cfg = _valid(run_stage1=False, **{"stage2.warm_start": "on", "stage2.mask_source": "extractor"})
    with pytest.raises(ConfigError, match=r"stage2\.warm_start.*run_stage1"):
        config_lib.validate_config(cfg)
    # the defaults: stage 2 is one level deeper, so `on` needs the depths made equal
    with pytest.raises(ConfigError, match=r"stage2\.warm_start.*num_layers"):
        config_lib.validate_config(_valid(**{"stage2.warm_start": "on"}))
    config_lib.validate_config(_valid(**{"stage2.warm_start": "on", "stage2.num_layers": 2}))
    config_lib.validate_config(_valid(**{"stage2.features": 32}))  # auto: decided by the mask


def test_json_round_trip():
    cfg = _valid(**{"stage1.patch_size": 128})
    again = config_lib.from_json(config_lib.to_json(cfg))
    assert again.to_dict() == cfg.to_dict() or config_lib.to_json(again) == config_lib.to_json(cfg)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserInputError, match="nope.py"):
        config_lib.load_config(str(tmp_path / "nope.py"))


def test_readme_documents_every_key():
    readme = (ROOT / "README.md").read_text()
    for line in config_lib.config_table().splitlines()[2:]:
        key = line.split("`")[1]
        assert f"`{key}`" in readme, f"README config table lacks {key}"
        assert not line.rstrip().endswith("|  |"), f"no description for {key}"


def test_posterior_and_strategy_choices_match_the_library():
    from autostructn2v_jax import posterior

    assert config_lib.POSTERIOR_MODES == ("off",) + posterior.NOISE_MODELS
    for mode in config_lib.POSTERIOR_MODES:
        cfg = _valid(posterior_mean=mode)
        config_lib.validate_config(cfg)
    cfg = _valid(**{"stage1.replacement_strategy": "median", "stage2.replacement_strategy": "median"})
    config_lib.validate_config(cfg)
