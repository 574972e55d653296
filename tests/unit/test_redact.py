"""ctray.redact: which names and parameters count as secrets, and the ingest's stored configs (the
manifest's `config`, ingest-config.yaml) going through it. Every secret is a canary string that
must appear nowhere in the output."""

import json

import pytest
import yaml

from ctray.config import StorageConfig
from ctray.ingest.job import config_yaml
from ctray.ingest.records import Records, build_manifest
from ctray.ingest.shardset import ShardSet
from ctray.redact import REDACTED, redact_text, redacted

from helpers import ingest_cfg

CANARY = "canary-7f3a91"


@pytest.mark.parametrize(
    "param",
    [
        *("auth", "token", "sig", "signature", "X-Amz-Signature", "X-Amz-Security-Token", "key", "password"),
        *("api_key", "apiKey", "access_token", "client_secret", "X-Goog-Credential", "pwd", "jwt"),
        "SharedAccessSignature",
    ],
)
def test_secret_query_parameters_are_redacted(param):
    url = f"https://store.example.org/bucket/a.nii.gz?x=1&{param}={CANARY}&y=2"
    assert redact_text(url) == f"https://store.example.org/bucket/a.nii.gz?x=1&{param}={REDACTED}&y=2"
    assert redact_text(f"https://h/p?{param}={CANARY}") == f"https://h/p?{param}={REDACTED}"


def test_other_query_parameters_and_separators():
    plain = "https://h/p?X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&part=3&x=1"
    assert redact_text(plain) == plain
    # an Azure connection string and an OAuth fragment carry secrets the same way
    conn = f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={CANARY};EndpointSuffix=core.windows.net"
    assert redact_text(conn) == conn.replace(CANARY, REDACTED)
    assert redact_text(f"https://h/cb#access_token={CANARY}&state=1") == f"https://h/cb#access_token={REDACTED}&state=1"


@pytest.mark.parametrize(
    "name",
    [
        *("CTRAY_TEST_DB_PASS", "CTRAY_TEST_APIKEY", "CTRAY_TEST_API_KEY", "CTRAY_TEST_CONNECTION_STRING"),
        *("CTRAY_TEST_DSN", "CTRAY_TEST_PASSWORD", "CTRAY_TEST_PWD", "CTRAY_TEST_SECRET", "CTRAY_TEST_TOKEN"),
    ],
)
def test_secret_named_environment_variables(monkeypatch, name):
    monkeypatch.setenv(name, CANARY)
    assert redact_text(f"s3://bucket/{CANARY}/shards") == f"s3://bucket/{REDACTED}/shards"
    field = name.removeprefix("CTRAY_TEST_").lower()
    assert redacted({"db": {field: "x", "host": "h"}}) == {"db": {field: REDACTED, "host": "h"}}


def test_setting_names_are_not_secrets(monkeypatch):
    """Variables that name settings, not credentials: blanking their values would blank words."""
    for name in ("RAY_AUTH_MODE", "AWS_S3_SIGNATURE_VERSION", "PWD", "BYPASS_CACHE"):
        monkeypatch.setenv(name, "disabled-value")
    assert redact_text("mode disabled-value") == "mode disabled-value"
    dump = {"tokenizer": "wordpiece", "max_tokens": 512, "smooth_sigma": 1.0, "connect_timeout_s": 5.0}
    assert redacted(dump) == dump


def test_a_variable_name_stays_a_pasted_key_does_not():
    """`*_env` fields hold the name of the variable holding a secret: ctray reads it back."""
    out = redacted({"id_key_env": "MY_ID_KEY", "api_key_env": f"sk-{CANARY}", "api_key_file": "/run/secrets/k"})
    assert out == {"id_key_env": "MY_ID_KEY", "api_key_env": REDACTED, "api_key_file": REDACTED}


def test_ingest_manifest_and_config_yaml_are_redacted(tmp_path, monkeypatch):
    """The manifest's config and ingest-config.yaml, as run_ingest writes them (the run itself:
    integration/test_llm.py), hold no canary; the manifest still reads back."""
    monkeypatch.setenv("CTRAY_TEST_DB_PASS", CANARY + "-env")
    cfg = ingest_cfg(
        tmp_path / "scans",
        tmp_path / "out",
        f"storage.endpoint_url=https://user:{CANARY}-userinfo@minio.example.org/"
        f"${{CTRAY_TEST_DB_PASS}}/?auth={CANARY}-auth&X-Amz-Signature={CANARY}-sig",
        f"reports.llm.api_key_file=/secrets/{CANARY}-file",
        "privacy.id_key_env=MY_ID_KEY",
    )
    assert CANARY in cfg.model_dump_json()  # the canaries are in the config the run uses
    manifest = build_manifest(str(tmp_path / "out"), StorageConfig(), cfg, "f" * 16, Records([], []), [], [], [], [])
    texts = {"manifest.json": manifest.to_json(), "ingest-config.yaml": config_yaml(cfg)}
    assert [where for where, text in texts.items() if CANARY in text] == []
    stored = json.loads(texts["manifest.json"])["config"]
    assert stored == yaml.safe_load(texts["ingest-config.yaml"])
    assert stored["storage"]["endpoint_url"] == (
        f"https://{REDACTED}@minio.example.org/{REDACTED}/?auth={REDACTED}&X-Amz-Signature={REDACTED}"
    )
    read_back = ShardSet.from_json(texts["manifest.json"], str(tmp_path / "out"), StorageConfig())
    assert read_back.ingest.privacy.id_key_env == "MY_ID_KEY"  # `ctray purge` finds the key by it
    assert read_back.ingest.preprocess == cfg.preprocess
