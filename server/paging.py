"""Opaque page tokens: keyset pagination that neither skips nor repeats under concurrent writes.

A token carries the sort key of the last item returned and a fingerprint of the query; the next
page holds the items whose key sorts after it. A token from another query, or one that does not
decode, is answered INVALID_ARGUMENT naming ``page_token``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from aqimodels.client.errors import InvalidArgumentError

T = TypeVar("T")
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_MAX_TOKEN_LENGTH = 2048


def page_size(value: int) -> int:
    """The effective page size: 0 means the default; above the maximum is coerced down."""
    if value < 0:
        raise InvalidArgumentError(f"page_size must not be negative, got {value}", field="page_size")
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _fingerprint(query: Sequence[Any]) -> str:
    return hashlib.sha256(json.dumps(list(query), sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode_token(last_key: Sequence[Any], query: Sequence[Any]) -> str:
    raw = json.dumps({"k": list(last_key), "q": _fingerprint(query)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_token(token: str, query: Sequence[Any]) -> list[Any] | None:
    """The last key of a token for this query; None for an empty token."""
    if not token:
        return None
    bad = InvalidArgumentError("page_token is invalid or belongs to another query; "
                               "start again without a page_token", field="page_token")
    if len(token) > _MAX_TOKEN_LENGTH:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise bad from None
    if not isinstance(data, dict) or data.get("q") != _fingerprint(query):
        raise bad
    key = data.get("k")
    if not isinstance(key, list) or not all(isinstance(k, (int, float, str)) and not isinstance(k, bool)
                                            for k in key):
        raise bad
    return key


def paginate(items: Sequence[T], key: Callable[[T], Sequence[Any]], size: int, token: str,
             query: Sequence[Any]) -> tuple[list[T], str]:
    """One page of ``items`` (sorted by ``key``, which must be unique) and the next token."""
    ordered = sorted(items, key=lambda it: tuple(key(it)))
    last = decode_token(token, query)
    if last is not None:
        try:
            ordered = [it for it in ordered if tuple(key(it)) > tuple(last)]
        except TypeError:
            raise InvalidArgumentError("page_token is invalid or belongs to another query",
                                       field="page_token") from None
    page = ordered[:size]
    next_token = encode_token(key(page[-1]), query) if len(ordered) > size else ""
    return page, next_token
