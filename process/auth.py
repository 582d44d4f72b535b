"""Bearer tokens and roles at the edge of a process: who may call which RPC.

A token file (``AQIMODELS_TOKENS_FILE``, TOML) lists entries with a name, a role and the token's
SHA-256, never the token itself::

    [[tokens]]
    name = "ci-deployer"
    role = "admin"
    sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"

``aqimodels token create NAME --role ROLE`` prints a fresh token and the entry to append.
Roles are ordered: ``viewer`` < ``operator`` < ``admin``. Each process passes its table of RPCs
and the lowest role allowed to call each (the registry's is ``server.auth.RPC_ROLES``, the
worker's :data:`WORKER_RPC_ROLES`). Missing or unknown token: UNAUTHENTICATED; role too low:
PERMISSION_DENIED; both are audited with the caller's name (or ``anonymous``). Health checks and
reflection need no token.
"""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog

from aqimodels.client.domain import Caller
from aqimodels.client.errors import PermissionDeniedError, UnauthenticatedError
from aqimodels.client.tokens import ROLES
from aqimodels.process.settings import ConfigError

log = structlog.get_logger(__name__)

_WORKER = "/aqimodels.api.training.v1.TrainingWorker/"

# Every RPC of the training worker and the lowest role that may call it.
WORKER_RPC_ROLES: dict[str, str] = {
    _WORKER + "GetWorkerInfo": "viewer",
    _WORKER + "ValidateDataset": "operator",
    _WORKER + "Train": "operator",
    _WORKER + "AttachTraining": "operator",
    _WORKER + "CancelTraining": "operator",
}


@dataclass(frozen=True)
class TokenEntry:
    name: str
    role: str
    sha256: bytes


class TokenStore:
    """The entries of a token file; lookups compare hashes in constant time."""

    def __init__(self, entries: list[TokenEntry]) -> None:
        self.entries = entries

    @classmethod
    def load(cls, path: str | Path, variable: str = "AQIMODELS_TOKENS_FILE") -> TokenStore:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{variable}: token file {path} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
            raise ConfigError(f"{variable}: token file {path} is not valid TOML: {exc}") from None
        entries = []
        for i, raw in enumerate(data.get("tokens", [])):
            if not isinstance(raw, dict):
                raise ConfigError(f"{variable}: entry {i + 1} of {path} is not a table")
            name, role, digest = raw.get("name"), raw.get("role"), str(raw.get("sha256", "")).lower()
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{variable}: entry {i + 1} of {path} has no name")
            if role not in ROLES:
                raise ConfigError(f"{variable}: entry {name!r} has role {role!r}; use one of {', '.join(ROLES)}")
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ConfigError(f"{variable}: entry {name!r} needs sha256 = the token's hex SHA-256")
            entries.append(TokenEntry(name, str(role), bytes.fromhex(digest)))
        if not entries:
            raise ConfigError(f"{variable}: token file {path} lists no [[tokens]]")
        return cls(entries)

    def lookup(self, token: str) -> TokenEntry | None:
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for entry in self.entries:  # no early exit: the time does not depend on which entry matches
            if hmac.compare_digest(entry.sha256, digest):
                found = entry
        return found


AuditSink = Callable[[str, str, str, str], None]  # (actor, role, rpc, message)


class Authenticator:
    """The interceptor's ``authenticate`` hook: metadata -> Caller, or a denial (audited)."""

    def __init__(self, tokens: TokenStore | None, roles: Mapping[str, str],
                 audit: AuditSink | None = None) -> None:
        self.tokens = tokens
        self.roles = roles  # method -> lowest role; an RPC missing here is refused
        self._audit = audit

    def __call__(self, method: str, metadata: Mapping[str, str]) -> Caller:
        if self.tokens is None:
            return Caller("anonymous", "admin")
        needed = self.roles.get(method)
        rpc = method.rsplit("/", 1)[-1]
        header = metadata.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        entry = self.tokens.lookup(token) if token else None
        if entry is None:
            why = "missing bearer token" if not token else "unknown token"
            self._deny("anonymous", "", rpc, why)
            raise UnauthenticatedError(f"{why}: send 'authorization: Bearer <token>' "
                                       "(aqimodels --token or AQIMODELS_TOKEN)")
        if needed is None:
            self._deny(entry.name, entry.role, rpc, "RPC not in the role table")
            raise PermissionDeniedError(f"{rpc} is not open to any role")
        if ROLES[entry.role] < ROLES[needed]:
            self._deny(entry.name, entry.role, rpc, f"needs role {needed}")
            raise PermissionDeniedError(f"{rpc} needs role {needed}; {entry.name!r} has role {entry.role}")
        return Caller(entry.name, entry.role)

    def _deny(self, actor: str, role: str, rpc: str, message: str) -> None:
        log.warning("rpc_denied", actor=actor, role=role, denied_rpc=rpc, reason=message)
        if self._audit is not None:
            try:
                self._audit(actor, role, rpc, message)
            except Exception:  # a failed audit write must not turn a denial into INTERNAL
                log.exception("denial_not_audited", actor=actor, denied_rpc=rpc)


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files (mutual TLS when a client CA is given); None without TLS."""
    if not cert:
        return None
    root = Path(client_ca).read_bytes() if client_ca else None
    return grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())],
                                       root_certificates=root, require_client_auth=bool(client_ca))


def bind(server: grpc.Server, address: str, creds: grpc.ServerCredentials | None) -> int:
    """Binds ``address`` (TLS when ``creds``); returns the port, raising OSError when it cannot."""
    port = server.add_secure_port(address, creds) if creds is not None else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    return int(port)


def authenticator(tokens_file: str, audit: AuditSink | None, component: str, roles: Mapping[str, str],
                  registry_token: str = "") -> Authenticator:
    """The authenticator of a process: open (with one warning) without a token file.

    ``registry_token``: the token of the registry that started this worker (an operator named
    ``registry``), trusted beside the file's entries.
    """
    if not tokens_file:
        log.warning("authentication_disabled", component=component,
                    hint="no AQIMODELS_TOKENS_FILE: every caller is anonymous with the admin role; "
                         "allowed on loopback only")
        return Authenticator(None, roles, audit)
    store = TokenStore.load(tokens_file)
    if registry_token:
        store.entries.append(TokenEntry("registry", "operator", hashlib.sha256(registry_token.encode()).digest()))
    return Authenticator(store, roles, audit)
