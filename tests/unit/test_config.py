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


def test_unknown_key_is_named_with_the_closest_known_one(tmp_path):
    """A typo in an override or a YAML key: one line naming the key and the section's closest key,
    in the section the key is in (a registered objective's own section under `objective:`); with
    none close, the section's keys."""
    from ctray.train.config import PretrainConfig

    with pytest.raises(ConfigError, match=r"preprocess\.spacingg: unknown key; did you mean preprocess\.spacing\?$"):
        load_config(IngestConfig, None, ["input.scans=a", "output.uri=b", "preprocess.spacingg=[1,1,1]"])
    base = ["objective.name=ctfm_simclr", "data.shards=s"]
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown key; did you mean optim\.lr\?"):
        load_config(PretrainConfig, None, [*base, "optim.lrr=0.1"])
    (tmp_path / "job.yaml").write_text("objective: {name: cagcl, globl_weight: 0}\ndata: {shards: s}\n")
    with pytest.raises(
        ConfigError, match=r"job\.yaml: objective\.globl_weight: unknown key; did you mean objective\.global_weight\?"
    ):
        load_config(PretrainConfig, tmp_path / "job.yaml")
    with pytest.raises(
        ConfigError, match=r"run\.mlflow\.zzz: unknown key; run\.mlflow has tracking_uri, experiment, parent_run_id$"
    ):
        load_config(PretrainConfig, None, [*base, "run.mlflow.zzz=1"])
    with pytest.raises(ConfigError, match=r"objectiv: unknown key; did you mean objective\?"):
        load_config(PretrainConfig, None, [*base, "objectiv.name=x"])


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


def _sections(model: type, seen: set[type]) -> None:
    """`model` and every section below it (a recipe's `objective:` as each registered objective)."""
    from ctray.config import Section, item_type, section_type

    if model in seen:
        return
    seen.add(model)
    for name in model.variants() if issubclass(model, Section) else {}:
        _sections(model.variants()[name], seen)
    for field in model.model_fields.values():
        inner = section_type(field.annotation) or section_type(item_type(field.annotation))
        if inner is not None:
            _sections(inner, seen)


def test_every_config_field_has_a_docstring():
    """Section's use_attribute_docstrings turns the string under each field into its description,
    which `ctray config show` prints: every field of every command's config has one (a section
    field may instead rely on its class docstring)."""
    from ctray.config import item_type, section_type
    from ctray.config_show import COMMANDS, command_config

    seen: set[type] = set()
    for command in COMMANDS:
        _sections(command_config(command), seen)
    assert len(seen) > 30
    missing = []
    for model in seen:
        for name, field in model.model_fields.items():
            inner = section_type(field.annotation) or section_type(item_type(field.annotation))
            inherited = any(
                getattr(base, "model_fields", {}).get(name, field).description for base in model.__mro__[1:]
            )
            if not (field.description or inherited or (inner is not None and inner.__doc__)):
                missing.append(f"{model.__name__}.{name}")
    assert missing == []


def test_an_objective_that_evaluates_during_training_needs_held_out_shards_or_says_it_has_none(caplog):
    """CA-GCL and TotalFM stage 2 score zero-shot figures during training: without eval.shards they
    would score the training scans, so the run refuses in one line unless the config opts in
    (the local jobs do, for their phantoms), and then warns. CT-FM has no in-training evaluation."""
    import logging

    from ctray.train.config import PretrainConfig
    from ctray.train.trainer import require_held_out

    from helpers import REPO

    local = load_config(PretrainConfig, REPO / "jobs/cagcl-local.yaml")
    assert local.eval.on_training_scans and local.eval.shards is None
    with caplog.at_level(logging.WARNING, logger="ctray"):
        require_held_out(local)
    assert "reads the training shards (eval.on_training_scans): not held-out" in caplog.text
    for job in (REPO / "jobs/cagcl-local.yaml", REPO / "jobs/totalfm-clip-local.yaml"):
        refused = load_config(PretrainConfig, job, ["eval.on_training_scans=false"])
        with pytest.raises(ConfigError, match=r"^eval.shards is not set, so the in-training evaluation would") as e:
            require_held_out(refused)
        assert "\n" not in str(e.value)
        held_out = load_config(PretrainConfig, job, ["eval.on_training_scans=false", "eval.shards=valid-shards"])
        require_held_out(held_out)  # a separate shard set: nothing to say
    require_held_out(load_config(PretrainConfig, REPO / "jobs/ctfm-local.yaml", ["eval.on_training_scans=false"]))
    require_held_out(
        load_config(
            PretrainConfig, REPO / "jobs/cagcl-local.yaml", ["eval.on_training_scans=false", "eval.enabled=false"]
        )
    )


def test_a_clip_type_recipe_refuses_gradient_accumulation_unless_told():
    """Accumulation does not enlarge a contrastive batch: CA-GCL and TotalFM stage 2 refuse it in one
    line naming both batch sizes, unless optim.accumulate_contrastive; CT-FM is not refused."""
    from ctray.train.config import PretrainConfig
    from ctray.train.trainer import require_whole_contrastive_batch

    from helpers import REPO

    for job in ("cagcl-local.yaml", "totalfm-clip-local.yaml"):
        cfg = load_config(PretrainConfig, REPO / "jobs" / job, ["optim.grad_accum=4"])
        micro = cfg.data.scans_per_batch
        with pytest.raises(
            ConfigError, match=rf"^optim.grad_accum=4 does not enlarge .* its {micro} scans, not {4 * micro};"
        ):
            require_whole_contrastive_batch(cfg)
        require_whole_contrastive_batch(
            cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"accumulate_contrastive": True})})
        )
    require_whole_contrastive_batch(
        load_config(PretrainConfig, REPO / "jobs" / "ctfm-local.yaml", ["optim.grad_accum=4"])
    )
