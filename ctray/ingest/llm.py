"""Reports -> anatomy-level findings through an OpenAI-compatible chat endpoint (TotalFM's route).

The endpoint is asked for JSON, the answer is validated against a schema built from the
configured anatomies, failed attempts are retried with backoff, and answers are cached by report
hash in the output storage, so re-runs and resumed jobs never pay twice. When every attempt
fails (or the answer is malformed) the rule parser is used and the reason's category is recorded
with the scan and counted in the manifest. A refused key (HTTP 401/403) is not a reason to fall
back: it fails the job, once at start (`check_endpoint`) or at the first report; so does a redirect.

Requests go to `base_url` only: no redirect is followed (urllib's would resend the key and the
report to wherever a 3xx points, over plain http too), no proxy is taken from the environment
(http_proxy would receive both), only `reports.llm.proxy` when set, and every request's URL is
checked against the https rule of the config (ctray.ingest.config.endpoint_problem).

Nothing here logs report text, the answer or the key: log lines and reasons name categories only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import fsspec
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from ctray.config import StorageConfig
from ctray.errors import ConfigError, CtrayError
from ctray.ingest.config import LLMConfig, endpoint_problem
from ctray.redact import redact_text
from ctray.storage import join, publish_bytes, with_retries

log = logging.getLogger(__name__)

PROMPT_VERSION = "v1"
CACHE_DIR = "_cache/llm"
"""Where answers are cached, below the ingest output."""
_SYSTEM = (
    "You split radiology reports into atomic finding sentences per anatomy. Answer with one JSON "
    "object whose keys are anatomy names from this list: {anatomies}. Each value is a list of short, "
    "self-contained sentences copied or minimally rephrased from the report about that anatomy, "
    'keeping negations ("No pleural effusion."). Leave out anatomies the report does not mention.'
)
# A report with no patient in it, for the check request at start.
_CHECK_REPORT = "The lungs are clear. Heart size is normal."


class LLMEndpointError(CtrayError):
    """The endpoint cannot be used as configured (every report would fail the same way): the job
    stops instead of falling back to the rules report by report."""


class LLMAuthError(LLMEndpointError):
    """The endpoint refused the API key (HTTP 401/403)."""


class LLMRedirectError(LLMEndpointError):
    """The endpoint answered with a redirect (3xx), which ctray does not follow with the key and a
    report: base_url must name the endpoint itself."""


class _Malformed(ValueError):
    """The endpoint answered, but not with a chat completion holding a findings object."""


@dataclass(frozen=True)
class Secret:
    """A credential that prints as *** (a repr in a log or a traceback shows nothing)."""

    value: str | None

    def __repr__(self) -> str:
        return "Secret(***)" if self.value else "Secret(None)"

    __str__ = __repr__


def read_api_key(cfg: LLMConfig) -> Secret:
    """The key from `api_key_file` or the driver's `api_key_env` (None for keyless local servers)."""
    if cfg.api_key_file:
        try:
            with open(os.path.expanduser(cfg.api_key_file)) as f:
                return Secret(f.read().strip() or None)
        except OSError as e:
            raise ConfigError(f"reports.llm.api_key_file {cfg.api_key_file}: {e.strerror}") from None
    return Secret(os.environ.get(cfg.api_key_env) or None)


def opener(cfg: LLMConfig) -> urllib.request.OpenerDirector:
    """An opener that speaks http(s) only, follows no redirect (a 3xx comes back as an HTTPError)
    and uses `cfg.proxy` or no proxy at all. urllib's default opener would do neither: it takes
    proxies from the environment and resends a request, headers included, to a redirect's target."""
    director = urllib.request.OpenerDirector()
    handlers: list[urllib.request.BaseHandler] = [
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.UnknownHandler(),
    ]
    if cfg.proxy:
        handlers.append(urllib.request.ProxyHandler({"http": cfg.proxy, "https": cfg.proxy}))
    for handler in handlers:
        director.add_handler(handler)
    return director


def endpoint_host(cfg: LLMConfig) -> str:
    """host[:port] of base_url, for messages (no userinfo, path or query)."""
    return urlsplit(cfg.base_url).netloc.rpartition("@")[2]


def findings_schema(anatomies: list[str]) -> type[BaseModel]:
    """A pydantic model accepting {anatomy: [non-empty sentences]} for the given anatomies only."""
    fields: dict[str, Any] = {a: (list[str] | None, None) for a in anatomies}
    return create_model("Findings", __config__=ConfigDict(extra="forbid"), **fields)


@dataclass(frozen=True)
class Parsed:
    """One report's anatomy sentences and how they were made."""

    findings: dict[str, list[str]]
    parser: str
    """"llm:<model>", "llm:<model> (cached)" or "rules (llm failed: <category>)"."""
    cache_key: str | None
    """The report's entry in the LLM cache (so `ctray purge` can remove it)."""


def _category(e: BaseException) -> str:
    """A failure's kind, without its text (an error body or a validation message can quote the report)."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code}"
    if isinstance(e, (TimeoutError, urllib.error.URLError)) and "timed out" in str(getattr(e, "reason", e)):
        return "timeout"
    if isinstance(e, (urllib.error.URLError, ConnectionError)):
        return "unreachable"
    if isinstance(e, ValidationError):
        return (
            "answer is not JSON"
            if any(err["type"] == "json_invalid" for err in e.errors())
            else "answer does not fit the schema"
        )
    if isinstance(e, json.JSONDecodeError):
        return "answer is not JSON"
    if isinstance(e, _Malformed):
        return str(e)
    return type(e).__name__


class LLMParser:
    """Callable: report text -> Parsed."""

    def __init__(
        self,
        cfg: LLMConfig,
        anatomies: list[str],
        fallback: Callable[[str], dict[str, list[str]]],
        cache_fs: fsspec.AbstractFileSystem,
        cache_root: str,
        storage: StorageConfig,
        api_key: Secret = Secret(None),
    ) -> None:
        self.cfg = cfg
        self.anatomies = anatomies
        self.schema = findings_schema(anatomies)
        self.fallback = fallback
        self.fs, self.cache_root, self.storage = cache_fs, cache_root, storage
        self.api_key = api_key
        self.opener = opener(cfg)

    def cache_key(self, text: str) -> str:
        h = hashlib.sha256()
        for part in (PROMPT_VERSION, self.cfg.model, ",".join(self.anatomies), text):
            h.update(part.encode("utf-8", "surrogatepass") + b"\0")
        return h.hexdigest()

    def __call__(self, text: str) -> Parsed:
        key = self.cache_key(text)
        path = cache_path(self.cache_root, key)
        try:
            cached = with_retries(lambda: self.fs.cat_file(path), "read llm cache", self.storage)
            return Parsed(json.loads(cached), f"llm:{self.cfg.model} (cached)", key)
        except FileNotFoundError:
            pass
        reason = ""
        delay = 1.0
        for attempt in range(1, self.cfg.retries + 1):
            try:
                findings = self.ask(text)
                publish_bytes(json.dumps(findings).encode(), self.fs, path, self.storage)
                return Parsed(findings, f"llm:{self.cfg.model}", key)
            except urllib.error.HTTPError as e:
                if e.code in (401, 403):
                    raise LLMAuthError(
                        f"LLM endpoint {redact_text(self.cfg.base_url)} refused the API key (HTTP {e.code})"
                    ) from None
                reason = _category(e)
            except (urllib.error.URLError, TimeoutError, OSError, ValueError, ValidationError) as e:
                reason = _category(e)
            log.warning("llm report parsing failed (attempt %d/%d): %s", attempt, self.cfg.retries, reason)
            if attempt < self.cfg.retries:
                time.sleep(delay)
                delay *= 2
        return Parsed(self.fallback(text), f"rules (llm failed: {reason})", None)

    def ask(self, text: str) -> dict[str, list[str]]:
        body = {
            "model": self.cfg.model,
            "temperature": 0,
            "response_format": {"type": "json_object"},
            "messages": [
                {"role": "system", "content": _SYSTEM.format(anatomies=", ".join(self.anatomies))},
                {"role": "user", "content": text},
            ],
        }
        url = self.cfg.base_url.rstrip("/") + "/chat/completions"
        problem = endpoint_problem(url, self.cfg)
        if problem:
            raise LLMEndpointError(problem)
        headers = {"Content-Type": "application/json"}
        if self.api_key.value:
            headers["Authorization"] = f"Bearer {self.api_key.value}"
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with self.opener.open(req, timeout=self.cfg.timeout_s) as resp:
                answer = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            if not 300 <= e.code < 400:
                raise
            e.close()
            # from None: the HTTPError holds the Location header, which may carry a token
            raise LLMRedirectError(
                f"LLM endpoint {endpoint_host(self.cfg)} answered HTTP {e.code} (a redirect), which ctray"
                " does not follow with the API key and reports: set reports.llm.base_url to the endpoint itself"
            ) from None
        parsed = self.schema.model_validate_json(_strip_fences(_content(answer)))
        out = {}
        for anatomy, sentences in parsed.model_dump().items():
            kept = [s.strip() for s in sentences or [] if isinstance(s, str) and s.strip()]
            if kept:
                out[anatomy] = kept
        return out


def cache_path(cache_root: str, key: str) -> str:
    """The cached answer for a report's cache key."""
    return join(cache_root, key[:2], key + ".json")


def _content(answer: object) -> str:
    """The first choice's message text of a chat completion, or _Malformed naming what is missing."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or not choices:
        raise _Malformed("answer has no choices")
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str) or not content.strip():
        raise _Malformed("answer has no message content")
    return content


def check_endpoint(cfg: LLMConfig, anatomies: list[str], api_key: Secret) -> None:
    """One request with a report that holds no patient, before any shard is written: a refused key,
    a redirect or an insecure URL fails the job at once; an endpoint that is down or answers badly
    is a warning (reports then fall back to the rules, counted by reason in the manifest)."""
    parser = LLMParser(cfg, anatomies, lambda text: {}, fsspec.filesystem("memory"), "/", StorageConfig(), api_key)
    try:
        parser.ask(_CHECK_REPORT)
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            key_from = f"file {cfg.api_key_file}" if cfg.api_key_file else f"${cfg.api_key_env}"
            raise LLMAuthError(
                f"LLM endpoint {redact_text(cfg.base_url)} refused the API key from {key_from} (HTTP {e.code})"
            ) from None
        log.warning(
            "LLM endpoint %s answered the check request with HTTP %d; reports may fall back to the rules",
            redact_text(cfg.base_url),
            e.code,
        )
    except (urllib.error.URLError, TimeoutError, OSError, ValueError, ValidationError) as e:
        log.warning(
            "LLM endpoint %s failed the check request (%s); reports may fall back to the rules",
            redact_text(cfg.base_url),
            _category(e),
        )


def _strip_fences(content: str) -> str:
    content = content.strip()
    if content.startswith("```"):
        content = content.split("\n", 1)[1] if "\n" in content else ""
        content = content.rsplit("```", 1)[0]
    return content
