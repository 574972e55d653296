"""Reports -> anatomy-level findings through an OpenAI-compatible chat endpoint (TotalFM's route).

The endpoint is asked for JSON, the answer is validated against a schema built from the
configured anatomies, failed attempts are retried with backoff, and answers are cached by report
hash in the output storage, so re-runs and resumed jobs never pay twice. When every attempt
fails the rule parser is used and the reason is recorded with the scan.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import urllib.error
import urllib.request
from typing import Callable

import fsspec
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from ctray.config import StorageConfig
from ctray.ingest.config import LLMConfig
from ctray.storage import join, publish_bytes, with_retries

log = logging.getLogger(__name__)

PROMPT_VERSION = "v1"
_SYSTEM = (
    "You split radiology reports into atomic finding sentences per anatomy. Answer with one JSON "
    "object whose keys are anatomy names from this list: {anatomies}. Each value is a list of short, "
    "self-contained sentences copied or minimally rephrased from the report about that anatomy, "
    "keeping negations (\"No pleural effusion.\"). Leave out anatomies the report does not mention."
)


def findings_schema(anatomies: list[str]) -> type[BaseModel]:
    """A pydantic model accepting {anatomy: [non-empty sentences]} for the given anatomies only."""
    fields = {a: (list[str] | None, None) for a in anatomies}
    return create_model("Findings", __config__=ConfigDict(extra="forbid"), **fields)


class LLMParser:
    """Callable: report text -> ({anatomy: [sentences]}, parser label for the row)."""

    def __init__(
        self,
        cfg: LLMConfig,
        anatomies: list[str],
        fallback: Callable[[str], dict[str, list[str]]],
        cache_fs: fsspec.AbstractFileSystem,
        cache_root: str,
        storage: StorageConfig,
    ):
        self.cfg = cfg
        self.anatomies = anatomies
        self.schema = findings_schema(anatomies)
        self.fallback = fallback
        self.fs, self.cache_root, self.storage = cache_fs, cache_root, storage

    def _key(self, text: str) -> str:
        h = hashlib.sha256()
        for part in (PROMPT_VERSION, self.cfg.model, ",".join(self.anatomies), text):
            h.update(part.encode("utf-8", "surrogatepass") + b"\0")
        return h.hexdigest()

    def __call__(self, text: str) -> tuple[dict[str, list[str]], str]:
        key = self._key(text)
        path = join(self.cache_root, key[:2], key + ".json")
        try:
            cached = with_retries(lambda: self.fs.cat_file(path), "read llm cache", self.storage)
            return json.loads(cached), f"llm:{self.cfg.model} (cached)"
        except FileNotFoundError:
            pass
        reason = ""
        delay = 1.0
        for attempt in range(1, self.cfg.retries + 1):
            try:
                findings = self._ask(text)
                publish_bytes(json.dumps(findings).encode(), self.fs, path, self.storage)
                return findings, f"llm:{self.cfg.model}"
            except (urllib.error.URLError, TimeoutError, OSError, ValueError, ValidationError, KeyError) as e:
                reason = f"{type(e).__name__}: {_summary(e)}"
                log.warning("llm report parsing failed (attempt %d/%d): %s", attempt, self.cfg.retries, reason)
                if attempt < self.cfg.retries:
                    time.sleep(delay)
                    delay *= 2
        return self.fallback(text), f"rules (llm failed: {reason})"

    def _ask(self, text: str) -> dict[str, list[str]]:
        body = {
            "model": self.cfg.model,
            "temperature": 0,
            "response_format": {"type": "json_object"},
            "messages": [
                {"role": "system", "content": _SYSTEM.format(anatomies=", ".join(self.anatomies))},
                {"role": "user", "content": text},
            ],
        }
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.cfg.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(
            self.cfg.base_url.rstrip("/") + "/chat/completions",
            data=json.dumps(body).encode(),
            headers=headers,
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
            answer = json.loads(resp.read())
        content = answer["choices"][0]["message"]["content"]
        parsed = self.schema.model_validate_json(_strip_fences(content))
        out = {}
        for anatomy, sentences in parsed.model_dump().items():
            kept = [s.strip() for s in sentences or [] if isinstance(s, str) and s.strip()]
            if kept:
                out[anatomy] = kept
        return out


def _strip_fences(content: str) -> str:
    content = content.strip()
    if content.startswith("```"):
        content = content.split("\n", 1)[1] if "\n" in content else ""
        content = content.rsplit("```", 1)[0]
    return content


def _summary(e: BaseException) -> str:
    # Validation errors quote the offending input, which is report text: keep only the locations.
    if isinstance(e, ValidationError):
        return "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['type']}" for err in e.errors()[:3])
    return (str(e).splitlines() or [""])[0][:200]
