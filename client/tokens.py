"""Tokens: creation and the token-file entry (the server keeps only the SHA-256)."""

from __future__ import annotations

import hashlib
import secrets

ROLES: dict[str, int] = {"viewer": 1, "operator": 2, "admin": 3}
"""The roles, ordered: each one may do everything the lower ones may."""


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token, as stored in the token file."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return "aqm_" + secrets.token_urlsafe(32)


def toml_entry(name: str, role: str, token: str) -> str:
    """The ``[[tokens]]`` entry to append to ``AQIMODELS_TOKENS_FILE`` for ``token``."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if not name or any(c in name for c in '"\\\n'):
        raise ValueError("name must be non-empty and hold no quotes, backslashes or newlines")
    return f'[[tokens]]\nname = "{name}"\nrole = "{role}"\nsha256 = "{hash_token(token)}"\n'
