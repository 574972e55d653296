"""The LLM report backend against an OpenAI-compatible HTTP endpoint on 127.0.0.1.

No LLM can run here, so the endpoint is a small local HTTP server that answers like vLLM's
/v1/chat/completions with scripted bodies and status codes; everything else (HTTP, JSON, schema
validation, retries, the cache in real storage, the fallback, the check at start, the key's way
to the workers) is ctray's real code. Redirect targets and proxies are more local servers that
record what reaches them, so a test sees where the key and the report (canaries) went.
"""

import json
import threading
import traceback
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer

import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from ctray.config import StorageConfig
from ctray.errors import ConfigError
from ctray.ingest.config import LLMConfig
from ctray.ingest.job import run_ingest
from ctray.ingest.llm import LLMAuthError, LLMEndpointError, LLMParser, LLMRedirectError, Secret, check_endpoint
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


@pytest.fixture
def recorder():
    """recorder(respond) -> (url, requests): a server on 127.0.0.1 that records every request
    (method, path, headers, body; CONNECT too, as a proxy gets it) and answers respond(path) ->
    (status, headers, body dict or None)."""
    servers = []

    def start(respond: Callable[[str], tuple[int, dict, dict | None]]) -> tuple[str, list]:
        requests: list[tuple[str, str, str, str]] = []

        class Handler(BaseHTTPRequestHandler):
            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode(errors="replace") if length else ""
                requests.append((self.command, self.path, str(self.headers), body))
                status, headers, payload = respond(self.path)
                data = json.dumps(payload).encode() if payload is not None else b""
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_CONNECT = _any

            def log_message(self, *args):
                pass

        server = HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}", requests

    yield start
    for server in servers:
        server.shutdown()


def _parser(url, tmp_path, retries=2, key=None, **settings):
    anatomies = ["lung", "heart"]
    cfg = LLMConfig(base_url=url, model="m", retries=retries, **settings)
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


CANARY_REPORT = "Heart size is normal. Canary-report-text-91c4 in the right upper lobe."
CANARY_TOKEN = "canary-location-token-2e7d"


def _leaks(*texts: str) -> list[str]:
    return [c for c in (KEY, "Canary-report-text", CANARY_TOKEN) for t in texts if c in t]


def _seen(requests: list[tuple[str, str, str, str]]) -> list[str]:
    """The canaries that reached a recorder, in any request's line, headers or body."""
    return _leaks(*(" ".join(request) for request in requests))


def _raised(call: Callable[[], object]) -> BaseException | None:
    try:
        call()
    except Exception as e:
        return e
    return None


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_an_error_and_not_followed(recorder, tmp_path, caplog, status):
    """urllib's default opener resent the key (and, for 307/308, the report) to wherever a 3xx
    pointed, plain http included; ctray stops with one line naming the status and its endpoint."""
    target, received = recorder(lambda path: (200, {}, _completion('{"lung": ["clear"]}')))
    redirector, asked = recorder(
        lambda path: (status, {"Location": f"{target}/v1/chat/completions?token={CANARY_TOKEN}"}, None)
    )
    err = _raised(lambda: _parser(redirector + "/v1", tmp_path, retries=3, key=KEY)(CANARY_REPORT))
    assert _seen(received) == [] and received == []  # not followed
    assert isinstance(err, LLMRedirectError) and len(asked) == 1  # an error at once, not retried
    message = str(err)
    host = redirector.removeprefix("http://")
    assert "\n" not in message and f"LLM endpoint {host} answered HTTP {status} (a redirect)" in message
    with pytest.raises(LLMRedirectError, match=f"HTTP {status}"):  # the check at start stops the job
        check_endpoint(LLMConfig(base_url=redirector + "/v1"), ["lung"], Secret(KEY))
    assert received == []
    assert _leaks(message, "".join(traceback.format_exception(err)), caplog.text) == []


PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def _proxy_environment(monkeypatch, proxy: str) -> None:
    """Every proxy variable names `proxy`, as in a job started with them."""
    for name in PROXY_VARIABLES:
        monkeypatch.setenv(name, proxy)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    # urlopen's opener reads the proxy variables once per process: as if this were its first call
    monkeypatch.setattr(urllib.request, "_opener", None)


def test_proxy_variables_are_ignored(endpoint, recorder, tmp_path, monkeypatch, caplog):
    """A proxy named by the environment would receive the key and every report: only
    reports.llm.proxy names one."""
    url, state = endpoint
    proxy, proxied = recorder(lambda path: (502, {}, None))
    _proxy_environment(monkeypatch, proxy)
    state["default"] = (200, _completion('{"lung": ["6 mm nodule in the right upper lobe."]}'))
    parsed = _parser(url, tmp_path, retries=1, key=KEY)(CANARY_REPORT)
    check_endpoint(LLMConfig(base_url=url), ["lung"], Secret(KEY))
    assert _seen(proxied) == [] and proxied == []
    assert parsed.parser == "llm:m" and state["requests"][0][1] == f"Bearer {KEY}" and len(state["requests"]) == 2
    assert _leaks(caplog.text) == []


def test_the_configured_proxy_is_used_and_tunnels_https(endpoint, recorder, tmp_path, monkeypatch, caplog):
    """reports.llm.proxy carries an https:// endpoint's requests as a CONNECT tunnel: the proxy
    learns the host, never the key or the report. The environment's proxy still plays no part."""
    url, state = endpoint
    proxy, proxied = recorder(lambda path: (502, {}, None))  # a proxy that cannot reach the endpoint
    decoy, decoyed = recorder(lambda path: (502, {}, None))
    _proxy_environment(monkeypatch, decoy)
    parsed = _parser("https://llm.example.org/v1", tmp_path, retries=1, key=KEY, proxy=proxy)(CANARY_REPORT)
    assert parsed.parser == "rules (llm failed: unreachable)"
    assert [(method, path) for method, path, _, _ in proxied] == [("CONNECT", "llm.example.org:443")]
    assert decoyed == [] and state["requests"] == []
    assert _seen(proxied) == [] and _leaks(caplog.text) == []
    # plain http through a proxy leaves this machine unencrypted, even to a loopback endpoint
    with pytest.raises(ConfigError, match=r"unencrypted through reports\.llm\.proxy"):
        ingest_cfg(
            tmp_path,
            tmp_path / "out",
            "reports.parser=llm",
            f"reports.llm.base_url={url}",
            f"reports.llm.proxy={proxy}",
        )
    with pytest.raises(ConfigError, match=r"reports\.llm\.proxy: proxy https://p:3128 must be http://host:port"):
        ingest_cfg(tmp_path, tmp_path / "out", "reports.llm.proxy=https://p:3128")


def test_https_is_enforced_for_the_url_requested(tmp_path, caplog):
    """A config built or changed without the config-time check (LLMConfig alone, an assignment)
    still sends nothing unencrypted to another host: the URL is checked at every request."""
    with pytest.raises(
        LLMEndpointError,
        match=r"^reports\.llm\.base_url http://llm\.example\.org/v1/chat/completions"
        r" sends report text unencrypted to another host",
    ):
        _parser("http://llm.example.org/v1", tmp_path, retries=3, key=KEY)(CANARY_REPORT)
    with pytest.raises(LLMEndpointError, match="is not an http:// or https:// URL"):
        _parser("file:///etc/passwd#", tmp_path, retries=1, key=KEY)(CANARY_REPORT)
    cfg = ingest_cfg(tmp_path, tmp_path / "out", "reports.parser=llm")
    cfg.reports.llm.base_url = "http://llm.example.org/v1"  # validate_assignment checks the field only
    with pytest.raises(LLMEndpointError, match="unencrypted to another host"):
        check_endpoint(cfg.reports.llm, ["lung"], Secret(KEY))
    assert _leaks(caplog.text) == []


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

    # an endpoint that starts redirecting mid-job stops the job like a refused key, no scan
    # quarantined as a bug and none committed
    state["answers"], state["default"] = [valid], (302, {})
    out3 = tmp_path / "out3"
    with pytest.raises(LLMRedirectError, match=r"HTTP 302 \(a redirect\)"):
        run_ingest(cfg.model_copy(update={"output": cfg.output.model_copy(update={"uri": str(out3)})}))
    assert list(out3.glob("_commits/*.json")) == []
