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
