"""Who is calling, and may they call this method: roles, default deny.

An identity is the client certificate's subject alternative name (or its common name) under
mutual TLS, or the name of a bearer token (``authorization: Bearer <token>``) for environments
without mTLS. ``Config.auth_roles`` maps identities to roles; each role allows a fixed set of
methods. A method no role of the caller allows is PERMISSION_DENIED naming the identity and
the method. Health and reflection are not registered through here and stay open.

The identities allowed each method are computed once when the handlers are built; a call costs
one identity lookup and one set membership test. With authorization off nothing is wrapped.
"""
from __future__ import annotations

import contextvars
import hashlib
import hmac
import ipaddress
import tomllib
from pathlib import Path
from typing import Mapping

import grpc

from reservd.config import ConfigError

# The identity of the caller of the RPC being handled (None when authorization is off); the
# service and the ledger read it for audit and ownership.
caller: contextvars.ContextVar[str | None] = contextvars.ContextVar("caller", default=None)
# That caller's roles (admin may act on any reservation, ops may read any).
caller_roles: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "caller_roles", default=frozenset()
)

_CHECKOUT = frozenset({
    "Reserve", "Commit", "Extend", "Release", "Fulfil", "Batch", "BatchStream", "GetReservation",
    "GetStock",
})
# ListChannels: a sync worker learns which channels to push (it is in the Admin service).
_SYNC = frozenset({"GetStock", "GetAts", "WatchStock", "WatchAts", "ListChannels"})
_READ_PREFIXES = ("Get", "List", "Watch")

ROLES = ("checkout", "sync", "ops", "admin")


def role_allows(role: str, service: str, method: str) -> bool:
    """Whether ``role`` may call ``method`` of ``service`` (short names, e.g. "Admin").

    checkout: the reservation lifecycle and stock reads; sync: stock and ATS reads and
    streams; ops: every read-only view (methods named Get*, List*, Watch*, in any service,
    alerts included); admin: everything, every Admin RPC included."""
    if role == "admin":
        return True
    if role == "ops":
        return method.startswith(_READ_PREFIXES)
    if role == "sync":
        return method in _SYNC
    if service != "Reservations":
        return False
    if role == "checkout":
        return method in _CHECKOUT
    raise ValueError(f"unknown role {role!r}")


def denied(owner: str, reservation_id: str, verb: str) -> str | None:
    """Why the caller may not ``verb`` a reservation ``owner`` made, or None when it may: its
    owner and admins may, ops may "read" it; anyone may when authorization is off or it was
    made with it off."""
    identity = caller.get()
    if identity is None or not owner or identity == owner:
        return None
    roles = caller_roles.get()
    if "admin" in roles or (verb == "read" and "ops" in roles):
        return None
    return (
        f"identity {identity!r} may not {verb} reservation {reservation_id!r}: another "
        "identity made it"
    )


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def load_tokens(path: Path) -> dict[str, str]:
    """A TOML file of ``identity = "token"``; raises ConfigError naming the problem."""
    try:
        with open(path, "rb") as file:
            table = tomllib.load(file)
    except OSError as error:
        raise ConfigError(f"auth_tokens_file: cannot read {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"auth_tokens_file: {path}: {error}") from None
    for identity, token in table.items():
        if not isinstance(token, str) or len(token) < 16:
            raise ConfigError(
                f"auth_tokens_file: {path}: {identity}: a token is a string of 16+ characters"
            )
    return table


def is_loopback(bind: str) -> bool:
    """Whether a ``host:port`` bind address listens on loopback only."""
    host = bind.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, "0.0.0.0" is parsed above; names may resolve to anything


class Authorizer:
    """Identifies callers and checks their roles; built once from the Config."""

    def __init__(
        self, roles: Mapping[str, tuple[str, ...]], tokens: Mapping[str, str] | None = None
    ) -> None:
        for identity, granted in roles.items():
            for role in granted:
                if role not in ROLES:
                    raise ConfigError(
                        f"auth_roles.{identity}: unknown role {role!r} (one of {', '.join(ROLES)})"
                    )
        self.roles = {identity: tuple(granted) for identity, granted in roles.items()}
        self._tokens = [(_digest(token), identity) for identity, token in (tokens or {}).items()]

    def permitted(self, service: str, method: str) -> frozenset[str]:
        """The identities that may call ``method`` of ``service``."""
        return frozenset(
            identity for identity, granted in self.roles.items()
            if any(role_allows(role, service, method) for role in granted)
        )

    def _token_identity(self, presented: str) -> str | None:
        digest = _digest(presented)
        found = None
        # Every token is compared, in constant time each: neither the time nor the order tells
        # which prefix or which token came close.
        for known, identity in self._tokens:
            if hmac.compare_digest(digest, known):
                found = identity
        return found

    def identify(self, context) -> str | None:
        """The caller's identity, or None when it presented none (or a token that is wrong,
        which is reported as such by ``check``)."""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                scheme, _, presented = value.partition(" ")
                if scheme.lower() != "bearer":
                    return None
                return self._token_identity(presented.strip())
        auth = context.auth_context()
        names = [
            name.decode(errors="replace")
            for name in auth.get("x509_subject_alternative_name", ())
        ] + [name.decode(errors="replace") for name in auth.get("x509_common_name", ())]
        for name in names:
            if name in self.roles:
                return name
        return names[0] if names else None

    def guard(self, service: str, method: str):
        """An ``async check(context)`` for one method: sets ``caller`` or aborts the call."""
        permitted = self.permitted(service, method)
        roles = {identity: frozenset(granted) for identity, granted in self.roles.items()}
        full = f"/reservd.v1.{service}/{method}"

        async def check(context) -> None:
            identity = self.identify(context)
            if identity is None:
                await context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"{full}: no valid client certificate or bearer token",
                )
            if identity not in permitted:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"identity {identity!r} may not call {full}",
                )
            caller.set(identity)
            caller_roles.set(roles[identity])

        return check


def from_config(config) -> Authorizer | None:
    """The Authorizer for a Config, or None when authorization is off."""
    tokens = load_tokens(config.auth_tokens_file) if config.auth_tokens_file else {}
    if not (config.auth_roles or tokens or config.tls_require_client_auth):
        return None
    return Authorizer(config.auth_roles, tokens)
