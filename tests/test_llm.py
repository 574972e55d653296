"""The LLM report backend against an OpenAI-compatible HTTP endpoint on 127.0.0.1.

No LLM can run here, so the endpoint is a small local HTTP server that answers like vLLM's
/v1/chat/completions with scripted content; everything else (HTTP, JSON, schema validation,
retries, the cache in real storage, the fallback) is ctray's real code.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from fsspec.implementations.local import LocalFileSystem

from ctray.config import StorageConfig
from ctray.ingest.config import LLMConfig
from ctray.ingest.llm import LLMParser
from ctray.ingest.reports import RuleParser

REPORT = "Heart size is normal. A 6 mm nodule in the right upper lobe."


@pytest.fixture
def endpoint():
    state = {"answers": [], "requests": []}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["requests"].append((self.path, self.headers.get("Authorization"), body))
            content = state["answers"].pop(0) if state["answers"] else "not json"
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1", state
    server.shutdown()


def _parser(url, tmp_path, retries=2):
    anatomies = ["lung", "heart"]
    cfg = LLMConfig(base_url=url, model="m", retries=retries, api_key_env="CTRAY_TEST_KEY")
    return LLMParser(cfg, anatomies, RuleParser(anatomies), LocalFileSystem(), str(tmp_path / "cache"), StorageConfig())


def test_valid_answer_is_used_and_cached(endpoint, tmp_path, monkeypatch):
    url, state = endpoint
    monkeypatch.setenv("CTRAY_TEST_KEY", "sk-secret")
    state["answers"] = ['```json\n{"lung": ["6 mm nodule in the right upper lobe."], "heart": ["Heart size is normal."]}\n```']
    parse = _parser(url, tmp_path)
    findings, label = parse(REPORT)
    assert findings == {"lung": ["6 mm nodule in the right upper lobe."], "heart": ["Heart size is normal."]}
    assert label == "llm:m"
    path, auth, body = state["requests"][0]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-secret"
    assert body["response_format"] == {"type": "json_object"} and body["messages"][1]["content"] == REPORT
    again, label = parse(REPORT)  # from the cache: no second request
    assert again == findings and label.endswith("(cached)") and len(state["requests"]) == 1


def test_invalid_answers_are_retried_then_rules_with_reason(endpoint, tmp_path, caplog):
    url, state = endpoint
    state["answers"] = ['{"liver": ["not a configured anatomy"]}', "not json at all"]
    findings, label = _parser(url, tmp_path, retries=2)(REPORT)
    assert len(state["requests"]) == 2
    assert findings == RuleParser(["lung", "heart"])(REPORT)
    assert label.startswith("rules (llm failed: ValidationError")
    assert "nodule" not in caplog.text  # report text stays out of the logs


def test_endpoint_down_falls_back(tmp_path):
    from conftest import free_port

    findings, label = _parser(f"http://127.0.0.1:{free_port()}/v1", tmp_path, retries=1)(REPORT)
    assert findings["heart"] == ["Heart size is normal."]
    assert "llm failed: URLError" in label
