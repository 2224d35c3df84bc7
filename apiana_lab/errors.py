"""Every error apiana_lab raises on purpose, each saying what to do next."""

from __future__ import annotations


class ApianaError(Exception):
    """Base class: catch this to handle any apiana_lab error."""


class ExportError(ApianaError):
    """An export file, folder or zip cannot be read at all."""

    def __init__(self, message: str, *, path: str | None = None, offset: int | None = None):
        self.path = path
        self.offset = offset
        where = f"{path}" if path else ""
        if offset is not None:
            where += f" at byte {offset}"
        super().__init__(f"{where}: {message}" if where else message)


class ConversationError(ApianaError):
    """One conversation is malformed; the reader skips it and counts the reason."""

    def __init__(self, reason: str, detail: str, *, conversation_id: str | None = None, index: int | None = None):
        self.reason = reason
        self.detail = detail
        self.conversation_id = conversation_id
        self.index = index
        who = f"conversation {conversation_id!r}" if conversation_id else f"conversation #{index}"
        super().__init__(f"{who} skipped ({reason}): {detail}")


class ConfigError(ApianaError):
    """A bad option, argument, model path or prompt file."""


class MissingDependencyError(ApianaError):
    """An optional library is not installed; the message names the install command."""

    def __init__(self, package: str, extra: str, *, distribution: str = "apiana-lab"):
        self.package = package
        self.extra = extra
        self.distribution = distribution
        checkout = " (or run `make install` in a checkout)" if distribution == "apiana-lab" else ""
        super().__init__(
            f"{package} is not installed. Install it with: pip install '{distribution}[{extra}]'{checkout}."
        )


class ProviderError(ApianaError):
    """A provider call failed. Each backend maps its library's errors to these, in one place.

    The scheduler (apiana_lab.summarize) acts on the subclass alone: transient retries, permanent
    fails that chunk, out of memory shrinks the batch, fatal stops the run; a plain ProviderError
    counts as permanent. Any exception that is not a ProviderError is a bug and stops the run
    with its traceback, keeping what finished.
    """


class TransientProviderError(ProviderError):
    """Timeouts, dropped connections, engine hiccups, 429/503: worth retrying with backoff.

    `retry_after` (seconds), when the backend said how long to wait (an HTTP Retry-After
    header), is the least the caller waits before retrying.
    """

    def __init__(self, message: str = "transient provider error", *, retry_after: float | None = None):
        self.retry_after = retry_after
        super().__init__(message)


class PermanentProviderError(ProviderError):
    """Retrying cannot help this one request: a prompt longer than the context, invalid input.

    `reason` is the short slug recorded for the failed chunk: "too_long" for a prompt that
    does not fit the model's context, "permanent" otherwise.
    """

    def __init__(self, message: str = "permanent provider error", *, reason: str = "permanent"):
        self.reason = reason
        super().__init__(message)


class FatalProviderError(ProviderError):
    """Going on cannot help any request (rejected credentials, say): the run stops at once.

    Summaries finished before it are kept; the message says what to fix.
    """


class ProviderOutOfMemoryError(ProviderError):
    """The batch did not fit in memory; the caller should retry with a smaller batch."""

    def __init__(self, message: str = "out of memory", *, batch_size: int | None = None):
        self.batch_size = batch_size
        super().__init__(message if batch_size is None else f"{message} (batch size {batch_size})")


class ParameterError(ConfigError):
    """A parameter (of a notebook, say) that cannot take its value; the message names it and what is allowed."""

    def __init__(self, name: str, value, problem: str, allowed: str):
        self.name = name
        self.value = value
        self.allowed = allowed
        super().__init__(f"parameter {name} = {value!r}: {problem}. Allowed: {allowed}.")
