import pytest

from ctray.config import apply_overrides, load_config, to_yaml
from ctray.errors import ConfigError
from ctray.ingest.config import IngestConfig


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("input: {scans: a}\noutput: {uri: b}\n")
    cfg = load_config(
        IngestConfig, path, ["output.uri=s3://bucket/shards", "preprocess.spacing=[2, 1.5, 1.5]", "input.segment=true"]
    )
    assert cfg.output.uri == "s3://bucket/shards"
    assert cfg.preprocess.spacing == (2.0, 1.5, 1.5)
    assert cfg.input.segment is True
    # round trip: what we write is what we read
    path.write_text(to_yaml(cfg))
    assert load_config(IngestConfig, path) == cfg


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"preprocess\.spacingg"):
        load_config(IngestConfig, None, ["input.scans=a", "output.uri=b", "preprocess.spacingg=[1,1,1]"])


def test_bad_values_fail_early():
    with pytest.raises(ConfigError, match="spacing"):
        load_config(IngestConfig, None, ["input.scans=a", "output.uri=b", "preprocess.spacing=[0,1,1]"])
    with pytest.raises(ConfigError, match="orientation"):
        load_config(IngestConfig, None, ["input.scans=a", "output.uri=b", "preprocess.orientation=SSL"])
    with pytest.raises(ConfigError, match="unknown TotalSegmentator class"):
        load_config(IngestConfig, None, ["input.scans=a", "output.uri=b", "preprocess.anatomies={lung: [lungs]}"])
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(IngestConfig, "/nonexistent.yaml")


def test_epochs_or_steps_and_the_linear_lr_rule(tmp_path):
    """train.epochs becomes steps from the scan count and the global batch (ceil), written back as
    max_steps so the run's config.yaml loads again; giving both is refused; the linear lr rule
    scales by views per optimizer step."""
    from ctray.train.config import PretrainConfig
    from ctray.train.trainer import steps_for_epochs

    base = ["objective.name=ctfm_simclr", "data.shards=s", "data.scans_per_batch=56", "scaling.num_workers=4"]
    cfg = load_config(PretrainConfig, None, [*base, "train.epochs=20"])
    assert steps_for_epochs(cfg, 1000) == 358  # ceil(20 x 1000 / 56)
    assert (
        steps_for_epochs(cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"grad_accum": 2})}), 1000) == 179
    )
    with pytest.raises(ValueError, match="not resolved"):
        _ = cfg.train.steps
    with pytest.raises(ConfigError, match="give max_steps or epochs, not both"):
        load_config(PretrainConfig, None, [*base, "train.epochs=20", "train.max_steps=10"])
    with pytest.raises(ConfigError, match=r"data\.synthetic"):
        load_config(PretrainConfig, None, [*base, "train.epochs=20", "data.synthetic=true"])
    cfg.train.max_steps, cfg.train.epochs = 358, None  # what ctray pretrain writes to config.yaml
    (tmp_path / "run.yaml").write_text(to_yaml(cfg))
    assert load_config(PretrainConfig, tmp_path / "run.yaml").train.steps == 358
    assert load_config(PretrainConfig, None, base).train.steps == 250_000
    scaled = load_config(
        PretrainConfig, None, [*base, "optim.lr=1.5e-4", "optim.lr_base_batch=256", "optim.lr_views_per_scan=13"]
    )
    assert scaled.peak_lr == pytest.approx(1.5e-4 * 56 * 13 / 256)
