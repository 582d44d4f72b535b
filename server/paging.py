"""Opaque page tokens: keyset pagination that neither skips nor repeats under concurrent writes.

A token carries the sort key of the last item returned and a fingerprint of the query; the next
page holds the items whose key sorts after it. A token from another query, or one that does not
decode, is answered INVALID_ARGUMENT naming ``page_token``.
"""

from __future__ import annotations

import base64
import binascii
import bisect
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


class SortedIndex:
    """Items sorted once by a unique key, paged by bisection: a page costs O(log n + page size).

    Build one per (immutable) collection and query, and keep it as long as the collection: at
    10,000 versions sorting on every request was most of ListModelVersions' time.
    """

    __slots__ = ("keys", "items")

    def __init__(self, items: Sequence[T], key: Callable[[T], Sequence[Any]]) -> None:
        pairs = sorted(((tuple(key(it)), it) for it in items), key=lambda p: p[0])
        self.keys = [k for k, _ in pairs]
        self.items = [it for _, it in pairs]

    def page(self, size: int, token: str, query: Sequence[Any]) -> tuple[list[Any], str]:
        """One page after the token's key and the next token ("" after the last page)."""
        last = decode_token(token, query)
        start = 0
        if last is not None:
            try:
                start = bisect.bisect_right(self.keys, tuple(last))
            except TypeError:
                raise InvalidArgumentError("page_token is invalid or belongs to another query",
                                           field="page_token") from None
        end = start + size
        page = self.items[start:end]
        next_token = encode_token(self.keys[end - 1], query) if end < len(self.items) else ""
        return page, next_token


def paginate(items: Sequence[T], key: Callable[[T], Sequence[Any]], size: int, token: str,
             query: Sequence[Any]) -> tuple[list[T], str]:
    """One page of ``items`` (sorted by ``key``, which must be unique) and the next token."""
    return SortedIndex(items, key).page(size, token, query)
