"""The LLM report backend against an OpenAI-compatible HTTP endpoint on 127.0.0.1.

No LLM can run here, so the endpoint is a small local HTTP server that answers like vLLM's
/v1/chat/completions with scripted bodies and status codes; everything else (HTTP, JSON, schema
validation, retries, the cache in real storage, the fallback, the check at start, the key's way
to the workers) is ctray's real code.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from ctray.config import StorageConfig
from ctray.errors import ConfigError
from ctray.ingest.config import LLMConfig
from ctray.ingest.job import run_ingest
from ctray.ingest.llm import LLMAuthError, LLMParser, Secret, check_endpoint
from ctray.ingest.maintain import purge
from ctray.ingest.reports import RuleParser

from helpers import free_port, ingest_cfg

REPORT = "Heart size is normal. A 6 mm nodule in the right upper lobe."
KEY = "sk-CANARY-key-5d1e"


def _completion(content) -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": content}}]}


@pytest.fixture
def endpoint():
    """answers: a list of (status, body dict) or content strings (200 + a completion holding them)."""
    state = {"answers": [], "requests": [], "default": (200, _completion("not json"))}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["requests"].append((self.path, self.headers.get("Authorization"), body))
            answer = state["answers"].pop(0) if state["answers"] else state["default"]
            status, payload = answer if isinstance(answer, tuple) else (200, _completion(answer))
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1", state
    server.shutdown()


def _parser(url, tmp_path, retries=2, key=None):
    anatomies = ["lung", "heart"]
    cfg = LLMConfig(base_url=url, model="m", retries=retries)
    return LLMParser(
        cfg, anatomies, RuleParser(anatomies), LocalFileSystem(), str(tmp_path / "cache"), StorageConfig(), Secret(key)
    )


def test_valid_answer_is_used_and_cached(endpoint, tmp_path):
    url, state = endpoint
    state["answers"] = [
        '```json\n{"lung": ["6 mm nodule in the right upper lobe."], "heart": ["Heart size is normal."]}\n```'
    ]
    parse = _parser(url, tmp_path, key=KEY)
    parsed = parse(REPORT)
    assert parsed.findings == {"lung": ["6 mm nodule in the right upper lobe."], "heart": ["Heart size is normal."]}
    assert parsed.parser == "llm:m" and parsed.cache_key == parse.cache_key(REPORT)
    path, auth, body = state["requests"][0]
    assert path == "/v1/chat/completions" and auth == f"Bearer {KEY}"
    assert body["response_format"] == {"type": "json_object"} and body["messages"][1]["content"] == REPORT
    again = parse(REPORT)  # from the cache: no second request
    assert again.findings == parsed.findings and again.parser.endswith("(cached)") and len(state["requests"]) == 1
    assert "CANARY" not in repr(Secret(KEY)) + str(Secret(KEY))


def test_invalid_answers_are_retried_then_rules_with_reason(endpoint, tmp_path, caplog):
    url, state = endpoint
    state["answers"] = ['{"liver": ["not a configured anatomy"]}', "not json at all"]
    parsed = _parser(url, tmp_path, retries=2)(REPORT)
    assert len(state["requests"]) == 2
    assert parsed.findings == RuleParser(["lung", "heart"])(REPORT)
    assert parsed.parser == "rules (llm failed: answer is not JSON)" and parsed.cache_key is None
    assert "nodule" not in caplog.text  # report text stays out of the logs


@pytest.mark.parametrize(
    "answer, reason",
    [
        ((200, {"choices": []}), "answer has no choices"),
        ((200, _completion(None)), "answer has no message content"),
        ((500, {"error": f"upstream failed on: {REPORT}"}), "HTTP 500"),
    ],
)
def test_malformed_answers_fall_back_to_the_rules(endpoint, tmp_path, caplog, answer, reason):
    url, state = endpoint
    state["default"] = answer
    parsed = _parser(url, tmp_path, retries=1)(REPORT)
    assert parsed.findings == RuleParser(["lung", "heart"])(REPORT)
    assert parsed.parser == f"rules (llm failed: {reason})"
    assert "nodule" not in caplog.text


def test_refused_key_fails_at_once(endpoint, tmp_path, caplog):
    url, state = endpoint
    state["default"] = (401, {"error": "invalid api key"})
    with pytest.raises(LLMAuthError, match="refused the API key"):
        _parser(url, tmp_path, retries=3, key=KEY)(REPORT)
    assert len(state["requests"]) == 1  # not retried like a network error, not a silent fallback
    with pytest.raises(LLMAuthError, match=r"refused the API key from \$CTRAY_TEST_KEY \(HTTP 401\)"):
        check_endpoint(LLMConfig(base_url=url, api_key_env="CTRAY_TEST_KEY"), ["lung"], Secret(KEY))
    assert KEY not in caplog.text


def test_endpoint_down_falls_back(tmp_path):
    parsed = _parser(f"http://127.0.0.1:{free_port()}/v1", tmp_path, retries=1)(REPORT)
    assert parsed.findings["heart"] == ["Heart size is normal."]
    assert parsed.parser == "rules (llm failed: unreachable)"


def test_plain_http_to_another_host_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="unencrypted"):
        ingest_cfg(
            tmp_path, tmp_path / "out", "reports.parser=llm", "reports.llm.base_url=http://vllm.internal:8000/v1"
        )
    ok = ingest_cfg(
        tmp_path,
        tmp_path / "out",
        "reports.parser=llm",
        "reports.llm.base_url=http://vllm.internal:8000/v1",
        "reports.llm.allow_insecure_http=true",
    )
    assert ok.reports.llm.allow_insecure_http
    ingest_cfg(tmp_path, tmp_path / "out", "reports.parser=llm", "reports.llm.base_url=https://llm.example.org/v1")
    ingest_cfg(tmp_path, tmp_path / "out", "reports.parser=rules", "reports.llm.base_url=http://vllm.internal:8000/v1")


CANARY_ENV_PASS = "canary-env-pass-6a0f"
CONFIG_CANARIES = ("canary-userinfo-c3d1", CANARY_ENV_PASS, "canary-auth-8b52", "canary-sig-40e9")
CANARY_ENDPOINT = (
    "https://user:canary-userinfo-c3d1@minio.example.org/${CTRAY_TEST_DB_PASS}/"
    "?auth=canary-auth-8b52&X-Amz-Signature=canary-sig-40e9"
)


def test_ingest_through_the_endpoint(ray_local, phantom_dir, endpoint, tmp_path, monkeypatch, caplog):
    """The key reaches the shard writers (other processes) through the object store: only the
    driver's environment has it. Fallbacks are counted by reason in the manifest; a refused key
    stops the job before anything is written. Secrets in the config (a storage endpoint, unused
    by a local output, holding canaries) are redacted in manifest.json and ingest-config.yaml."""
    url, state = endpoint
    monkeypatch.setenv("CTRAY_TEST_KEY", KEY)
    monkeypatch.setenv("CTRAY_TEST_DB_PASS", CANARY_ENV_PASS)
    valid = (200, _completion('{"lung": ["The lungs are clear."]}'))
    state["default"] = valid
    # in order: the check request, then the one shard's reports scan by scan
    state["answers"] = [valid, (200, {"choices": []}), (200, _completion(None))]
    out = tmp_path / "out"
    cfg = ingest_cfg(
        phantom_dir / "scans",
        out,
        "reports.parser=llm",
        f"reports.llm.base_url={url}",
        "reports.llm.retries=1",
        "reports.llm.api_key_env=CTRAY_TEST_KEY",
        "output.scans_per_shard=6",
        "lease.settle_s=0",
        f"storage.endpoint_url={CANARY_ENDPOINT}",
        reports=phantom_dir / "reports.jsonl",
    )
    result = run_ingest(cfg)
    assert result.scans == 6
    assert all(
        auth == f"Bearer {KEY}" for _, auth, _ in state["requests"]
    )  # check request + 6 reports, all with the key
    assert len(state["requests"]) == 7
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["llm_fallbacks"] == {"answer has no choices": 1, "answer has no message content": 1}
    assert KEY not in caplog.text and KEY not in (out / "manifest.json").read_text()
    stored = {name: (out / name).read_text() for name in ("manifest.json", "ingest-config.yaml")}
    assert [(c, name) for c in CONFIG_CANARIES for name, text in stored.items() if c in text] == []
    assert manifest["config"]["reports"]["llm"]["api_key_env"] == "CTRAY_TEST_KEY"  # a name, kept

    # `ctray purge` takes the scan's LLM cache entry with it
    shard = out / manifest["shards"][0]["path"]
    keys = dict(zip(*pq.read_table(shard, columns=["scan_id", "report_cache_key"]).to_pydict().values(), strict=False))
    entry = out / "_cache" / "llm" / keys["phantom0003"][:2] / (keys["phantom0003"] + ".json")
    assert entry.exists()
    purge(str(out), StorageConfig(), ["phantom0003"])
    assert [c for c in CONFIG_CANARIES if c in (out / "manifest.json").read_text()] == []  # purge rewrote it
    assert (
        not entry.exists()
        and (out / "_cache" / "llm" / keys["phantom0004"][:2] / (keys["phantom0004"] + ".json")).exists()
    )

    state["default"] = (403, {"error": "forbidden"})
    with pytest.raises(LLMAuthError, match="HTTP 403"):
        run_ingest(cfg.model_copy(update={"output": cfg.output.model_copy(update={"uri": str(tmp_path / "out2")})}))
    assert not (tmp_path / "out2" / "_commits").exists()
