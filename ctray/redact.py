"""Credentials out of everything ctray shows or stores: URL userinfo, credential-like query values,
the values of this process's secret-named environment variables, and config fields named like a
key, secret, token or password. The tracking backends, `ctray doctor`, the logged configs and the
ingest's manifest.json and ingest-config.yaml go through it."""

from __future__ import annotations

import itertools
import os
import re
from typing import Any

REDACTED = "***"
"""What a redacted value reads as."""
# Words that make a name (an environment variable, a config field, a query parameter) hold a
# secret: *_API_KEY, *_APIKEY, *_PASS, *_DSN (a DSN carries its password). Nouns of credentials
# only: RAY_AUTH_MODE=disabled or AWS_S3_SIGNATURE_VERSION=s3v4 name settings, and redacting their
# values would blank every "disabled" in a log.
_SECRET_WORDS = frozenset(
    {"key", "apikey", "secret", "token", "password", "passwd", "pass", "pwd", "credential", "credentials", "dsn"}
)
# Word pairs that do the same (AZURE_STORAGE_CONNECTION_STRING: account keys or SAS signatures).
_SECRET_PAIRS = frozenset({("connection", "string"), ("conn", "str")})
# Words of a name: separators and camelCase boundaries split them (accountKey, X-Amz-Signature).
_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")
# Query parameters are matched by stems too (accesstoken, apikey, xsig, authkey): a parameter
# needlessly hidden costs a log line some detail, a signature shown gives its URL's access away.
_QUERY_STEMS = ("key", "secret", "token", "sig", "pass", "pwd", "credential", "auth", "jwt")
# `;` and `#` too: connection strings (;AccountKey=...;SharedAccessSignature=...) and OAuth
# fragments (#access_token=...) carry secrets the same way.
_PARAM = re.compile(r"([?&;#])([^=&#;\s]+)=([^&#;\s]+)")
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
# A `*_env` field names the variable that holds a secret (id_key_env: CTRAY_ID_KEY); ctray reads the
# manifest's config back (`ctray purge` finds the pseudonymisation key by that name), so such a name
# stays. Anything else there (a key pasted in by mistake) is still redacted.
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


def _words(name: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(name)]


def _secret_name(name: str) -> bool:
    if name == "PWD":  # the shell's working directory, not a password (MYSQL_PWD is one)
        return False
    words = _words(name)
    return bool(_SECRET_WORDS.intersection(words)) or any(pair in _SECRET_PAIRS for pair in itertools.pairwise(words))


def _secret_param(name: str) -> bool:
    lowered = name.lower()
    return _secret_name(name) or any(stem in lowered for stem in _QUERY_STEMS)


def _redact_param(m: re.Match[str]) -> str:
    sep, name, value = m.groups()
    return f"{sep}{name}={REDACTED if _secret_param(name) else value}"


def redact_text(text: str) -> str:
    """`text` without URL userinfo (user:password@), the values of parameters whose name suggests a
    secret (?token=, ?auth=, ?sig=, X-Amz-Signature=, ;AccountKey=) and the values of this process's
    secret-named environment variables (AWS_SECRET_ACCESS_KEY, ..._TOKEN, ..._PASS, ..._DSN): a
    `${VAR}` in a config may have put one anywhere."""
    text = _PARAM.sub(_redact_param, _USERINFO.sub(REDACTED + "@", text))
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
    if value is not None and _secret_name(name) and not _names_a_variable(name, value):
        return REDACTED
    return redact_text(value) if isinstance(value, str) else value


def _names_a_variable(name: str, value: Any) -> bool:
    return _words(name)[-1:] == ["env"] and isinstance(value, str) and bool(_ENV_NAME.fullmatch(value))
