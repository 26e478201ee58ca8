"""Typed errors raised inside clipsearch; the edges (api.py, cli.py) turn them into HTTP or exit codes."""

from __future__ import annotations


class ClipsearchError(Exception):
    """Base class: the message is safe to show to a user."""

    code = "error"


class BadRequest(ClipsearchError):
    """The request or input is malformed (bad JSON, bad field, not an image)."""

    code = "bad_request"


class BadImage(BadRequest):
    """Bytes that are not a decodable, acceptable image."""

    code = "bad_image"


class NotFound(ClipsearchError):
    """An id or index that does not exist."""

    code = "not_found"


class PayloadTooLarge(ClipsearchError):
    code = "payload_too_large"


class UnsupportedMediaType(ClipsearchError):
    code = "unsupported_media_type"


class Unavailable(ClipsearchError):
    """A dependency (encoder endpoint, index) is temporarily unavailable; retry later."""

    code = "unavailable"

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModelFailed(Unavailable):
    """The model's container failed on a request (it answered 5xx): perhaps because of one input in it, so a
    request of several inputs is split to find it; one input alone is retried later. Its code stays the
    contract's "unavailable": to a search, it is a 503 like any other."""


class ModelMismatch(ClipsearchError):
    """The index was built with another model (or dimension) than the one requested."""

    code = "model_mismatch"


class ModelUnavailable(ClipsearchError):
    """The model cannot be loaded (offline and not cached, bad checkpoint)."""

    code = "model_unavailable"


class ConfigError(ClipsearchError):
    """A required setting is missing or invalid."""

    code = "config_error"


class IndexUnavailable(Unavailable):
    """The index's storage failed: disk full, an I/O error, or locked past the busy timeout (exit 1)."""

    code = "index_unavailable"


class IndexCorrupt(ClipsearchError):
    """The index file is damaged or is not an index; the message names `clipsearch check --repair` (exit 2)."""

    code = "index_corrupt"


class IndexReadOnly(ClipsearchError):
    """A write to an index that cannot be written: a read-only mount, folder or file (exit 2)."""

    code = "index_read_only"


class IndexMoved(Unavailable):
    """The index name now leads to an index of another model (a reindex switched it): reopen with that model."""

    code = "index_moved"
