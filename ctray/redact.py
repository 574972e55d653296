"""Credentials out of everything ctray shows or stores: URL userinfo, credential-like query values,
the values of this process's secret-named environment variables, and config fields named like a
key, secret, token or password. The tracking backends, `ctray doctor` and the logged configs go
through it."""

from __future__ import annotations

import os
import re
from typing import Any

REDACTED = "***"
"""What a redacted value reads as."""
_SECRET_WORDS = frozenset({"key", "secret", "token", "password", "passwd", "credential", "credentials"})
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
_SECRET_QUERY = re.compile(
    r"([?&][^=&#\s]*(?:key|secret|token|signature|sig|password|credential)[^=&#\s]*=)[^&#\s]+", re.IGNORECASE
)


def _secret_name(name: str) -> bool:
    return bool(_SECRET_WORDS & set(re.split(r"[^a-z0-9]+", name.lower())))


def redact_text(text: str) -> str:
    """`text` without URL userinfo (user:password@), credential-like query values (?token=...) and the
    values of this process's secret-named environment variables (AWS_SECRET_ACCESS_KEY, ..._TOKEN):
    a `${VAR}` in a config may have put one anywhere."""
    text = _SECRET_QUERY.sub(r"\1" + REDACTED, _USERINFO.sub(REDACTED + "@", text))
    for name, value in os.environ.items():
        if len(value) >= 8 and _secret_name(name) and value in text:
            text = text.replace(value, REDACTED)
    return text


def redacted(value: Any, name: str = "") -> Any:
    """A config dump with credential-like values replaced by ***: fields named like a key, secret,
    token or password, and the parts of any string `redact_text` removes. ctray keeps credentials
    out of configs (environment variables, instance roles), but a config can still carry one."""
    if isinstance(value, dict):
        return {k: redacted(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redacted(v, name) for v in value]
    if value is not None and _secret_name(name):
        return REDACTED
    return redact_text(value) if isinstance(value, str) else value
