"""Errors that the CLI turns into one clear line (no traceback) for the user."""


class CtrayError(Exception):
    """Base of errors a user can act on: bad config, unreachable storage, missing weights."""


class ConfigError(CtrayError):
    """A config file or override is invalid."""


class StorageError(CtrayError):
    """Storage stayed unreachable after the configured retries."""


class TrainingFailed(CtrayError):
    """A training run stopped on a failure that a restart would only repeat."""


class BadInput(CtrayError):
    """One input (scan, mask or report) cannot be used; batch jobs quarantine it and go on."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), for one-line errors."""
    text = str(e)
    return text.splitlines()[0][:200] if text else ""


def library_error(e: BaseException, quote: bool) -> str:
    """A library's exception as a reason may carry it: its type and first line, or with `quote`
    False its type only. Readers (nibabel, gzip, botocore) quote the file path or URL in their
    messages, so where inputs are named by pseudonym the message would name the patient."""
    return f"{type(e).__name__}: {first_line(e)}" if quote else type(e).__name__
