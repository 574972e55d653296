"""The `ctray` command in this process (ctray.cli.main): help everywhere, one-line errors, the
shipped jobs, and the segment-weights check. The command as a process of its own:
integration/test_cli_process.py."""

import os

import pytest
import yaml

import ctray
from ctray import cli
from ctray.cli import main
from ctray.errors import ConfigError

from helpers import REPO, free_port

COMMANDS = [
    [],
    ["ingest"],
    ["pretrain"],
    ["sweep"],
    ["verify"],
    ["purge"],
    ["phantoms"],
    ["quickstart"],
    ["embed"],
    ["eval"],
    ["doctor"],
    ["config"],
    ["config", "show"],
]
BENCHES = [["bench"], ["bench", "ingest"], ["bench", "data"], ["bench", "scale"], ["bench", "step"]]


@pytest.mark.parametrize("cmd", COMMANDS + BENCHES, ids=lambda cmd: " ".join(cmd) or "ctray")
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as done:
        main([*cmd, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: ctray {' '.join(cmd)}".rstrip())


def test_doctor_without_a_ray_at_the_address_says_so_in_one_line(capsys, tmp_path):
    port = free_port()  # nothing listens there
    assert main(["doctor", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ctray: error: no Ray cluster at 127.0.0.1:{port}: [Errno 111] Connection refused"]
    (tmp_path / "notajob.yaml").write_text("name: x\n")
    with pytest.raises(ConfigError, match=r"notajob\.yaml: not a pretrain, sweep or ingest config"):
        from ctray.doctor import diagnose

        diagnose(f"127.0.0.1:{port}", [str(tmp_path / "notajob.yaml")])


def test_segment_without_weights_is_a_clear_error(tmp_path, monkeypatch):
    """TotalSegmentator weights cannot be downloaded here; the check must say what to do."""
    from ctray.ingest import segment

    try:
        import totalsegmentator  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"pip install 'ctray\[segment\]'"):
            segment.check_weights(fast=False)
        return
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="totalseg_download_weights -t total"):
        segment.check_weights(fast=False)


def test_class_table_matches_totalsegmentator():
    ts = pytest.importorskip(
        "totalsegmentator.map_to_binary", reason="TotalSegmentator not installed (extra [segment])"
    )
    from ctray.anatomy import TOTAL_CLASSES

    assert ts.class_map["total"] == {i + 1: n for i, n in enumerate(TOTAL_CLASSES)}


def test_every_job_yaml_validates(monkeypatch):
    """The shipped configs load into their typed models (a renamed field breaks here, not on a cluster);
    the cluster jobs take their bucket from $CTRAY_BUCKET, and say so when it is not set."""
    from ctray.config import load_config
    from ctray.evaluate.config import EvalReportConfig
    from ctray.ingest.config import IngestConfig
    from ctray.train.config import PretrainConfig
    from ctray.tune.config import SweepConfig

    kinds = {
        "ingest": IngestConfig,
        "ctfm": PretrainConfig,
        "totalfm": PretrainConfig,
        "cagcl": PretrainConfig,
        "sweep": SweepConfig,
        "eval": EvalReportConfig,
    }
    monkeypatch.delenv("CTRAY_BUCKET", raising=False)
    with pytest.raises(ConfigError, match=r"data.shards uses \$\{CTRAY_BUCKET\}, which is not set"):
        load_config(PretrainConfig, REPO / "jobs" / "ctfm.yaml")
    monkeypatch.setenv("CTRAY_BUCKET", "s3://acme-ct")
    assert load_config(PretrainConfig, REPO / "jobs" / "ctfm.yaml").data.shards == "s3://acme-ct/ctray/shards"
    for path in sorted((REPO / "jobs").glob("*.yaml")):
        model = kinds[path.stem.split("-")[0]]
        cfg = load_config(model, path)
        if model is SweepConfig:
            load_config(PretrainConfig, REPO / cfg.base, cfg.overrides)


def test_verbose_shows_every_workers_lines(tmp_path, monkeypatch):
    """`ctray -v` turns off Ray's log deduplication (every worker's copy of a line, not "[repeated Nx
    across cluster]"); it is set before any command imports Ray, whose log monitor reads it then."""
    monkeypatch.delenv("RAY_DEDUP_LOGS", raising=False)
    assert main(["phantoms", str(tmp_path / "a"), "--n", "1", "--shape", "16", "32", "32"]) == 0
    assert "RAY_DEDUP_LOGS" not in os.environ
    assert main(["-v", "phantoms", str(tmp_path / "b"), "--n", "1", "--shape", "16", "32", "32"]) == 0
    assert os.environ["RAY_DEDUP_LOGS"] == "0"


def test_version_names_ctray_and_its_stack(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"ctray {ctray.__version__}"
    assert [line.split()[0] for line in lines[1:]] == ["python", *cli.STACK]
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)


def test_print_config_prints_the_resolved_config_without_credentials(capsys, monkeypatch):
    """--print-config: the YAML as the command would run it (the job's YAML, then the overrides,
    then ${VAR}s), wherever the flag stands among the overrides, and nothing run; a credential that
    reaches the config through ${VAR} (a canary in a secret-named variable, alone and inside a URL)
    is ***."""
    canary = "canary-5e3f9d1b7a"
    monkeypatch.setenv("CTRAY_CANARY_TOKEN", canary)
    monkeypatch.setenv("CTRAY_TEST_RUN", "resolved-run")
    monkeypatch.setattr(cli, "_pretrain", lambda cfg: pytest.fail("--print-config ran the command"))
    argv = [
        "pretrain",
        str(REPO / "jobs" / "ctfm-local.yaml"),
        "train.max_steps=3",
        "--print-config",
        "run.name=${CTRAY_TEST_RUN}",
        "run.group=${CTRAY_CANARY_TOKEN}",
        "run.mlflow.tracking_uri=https://ctray:${CTRAY_CANARY_TOKEN}@mlflow.example:5000",
    ]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert canary not in out + err
    printed = yaml.safe_load(out)
    assert printed["objective"]["name"] == "ctfm_simclr"  # from the YAML
    assert printed["train"]["max_steps"] == 3  # an override
    assert printed["train"]["log_every"] == 2  # the YAML's value, not the default
    assert printed["run"]["name"] == "resolved-run"  # ${VAR} expanded
    assert printed["run"]["group"] == "***"
    assert printed["run"]["mlflow"]["tracking_uri"] == "https://***@mlflow.example:5000"
    assert printed["optim"]["weight_decay"] == 1e-6  # a default the YAML leaves out


def test_config_show_lists_fields_with_type_default_and_docstring(capsys):
    assert main(["config", "show", "pretrain.optim"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pretrain.optim (OptimConfig): torch AdamW")
    assert "\n  lr: float = 0.0001\n      Peak learning rate (CT-FM 1e-4).\n" in out
    assert "\n  lr_base_batch: int | None = null\n" in out
    assert main(["config", "show", "pretrain"]) == 0
    out = capsys.readouterr().out
    assert "\n  optim: OptimConfig\n" in out and "\n    lr: float = 0.0001\n" in out  # nested, indented
    assert "\n      tracking_uri: str | None = null\n" in out  # run.mlflow, two levels down
    assert "ctray config show pretrain.objective.<name>" in out
    assert '\n    placement_strategy: "PACK" | "SPREAD" | "STRICT_PACK" | "STRICT_SPREAD" = "PACK"\n' in out
    assert main(["config", "show", "pretrain.objective.cagcl.global_weight"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pretrain.objective.cagcl.global_weight: float = ")
    assert main(["config", "show", "pretrain.optm"]) == 2
    assert "did you mean pretrain.optim?" in capsys.readouterr().err
