"""API keys, the roles they carry and the tenants they belong to.

A key is a 256-bit random token (``ember_`` + 43 URL-safe characters). Ember stores only its
SHA-256: a token this long cannot be guessed, so a slow password hash would add cost on every
request and no safety. A key's *id* (the first 12 hex digits of its hash) names it in ``ember keys
ls`` and ``ember keys revoke``; the id cannot be turned back into the key.

Roles, from most to least:

* ``admin``: everything, in every tenant, and the keys and tenants themselves;
* ``deployer``: deploy, remove, load and unload models of its tenant, and call them;
* ``invoker``: call and inspect models of its tenant.

Each tenant has a namespace of model names: ``m`` deployed by a key of ``acme`` is ``acme+m``, and
that key may call it ``m``. So no tenant learns from a name clash that another deployed a model.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "ADMIN_KEY_FILE",
    "DEFAULT_TENANT",
    "KEY_PREFIX",
    "METRICS_KEY_FILE",
    "KeyRecord",
    "NewKey",
    "Principal",
    "Role",
    "check_tenant_name",
    "hash_key",
    "key_id",
    "new_key",
    "qualify",
]

#: The tenant of deployments made before tenants existed, and of an admin's deploys by default.
DEFAULT_TENANT = "default"
#: The file in Ember's home holding the admin key made at first start (mode 0600).
ADMIN_KEY_FILE = "admin.key"
#: The file in Ember's home holding the key that opens ``GET /metrics`` alone (mode 0600).
METRICS_KEY_FILE = "metrics.key"
KEY_PREFIX = "ember_"

#: Matched whole (``fullmatch``): ``$`` alone would let a trailing newline through.
TENANT_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
#: Between a tenant and a model name: ``acme+resnet``. Model and tenant names cannot hold it.
TENANT_SEPARATOR = "+"


class Role(StrEnum):
    ADMIN = "admin"
    DEPLOYER = "deployer"
    INVOKER = "invoker"


def check_tenant_name(name: str) -> str:
    """``name`` if it is a valid tenant name; ``ValueError`` saying the rule otherwise."""
    if not isinstance(name, str) or not TENANT_PATTERN.fullmatch(name):
        raise ValueError(
            f"tenant name {name!r} is not allowed: use 1-63 lowercase letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def qualify(tenant: str | None, name: str) -> str:
    """The name of model ``name`` in ``tenant``'s namespace: ``tenant+name``.

    The default tenant's models (and every name an admin gives: tenant None) keep their plain names.
    A name already in the tenant's namespace is returned as it is, so ``acme+m`` and ``m`` are the
    same model to a key of ``acme``; a key of another tenant can only ever name its own models.
    """
    if tenant is None or tenant == DEFAULT_TENANT or name.startswith(tenant + TENANT_SEPARATOR):
        return name
    return f"{tenant}{TENANT_SEPARATOR}{name}"


def hash_key(key: str | bytes) -> str:
    """The stored form of a key: its SHA-256, in hex."""
    raw = key.encode("utf-8", "surrogateescape") if isinstance(key, str) else key
    return hashlib.sha256(raw).hexdigest()


def key_id(key_hash: str) -> str:
    return key_hash[:12]


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key's tenant and role (``tenant`` is None for an admin)."""

    key_id: str
    role: Role
    tenant: str | None

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    def sees(self, tenant: str) -> bool:
        """Whether this caller may know that a model of ``tenant`` exists."""
        return self.tenant is None or self.tenant == tenant

    @property
    def can_deploy(self) -> bool:
        return self.role is not Role.INVOKER


@dataclass(frozen=True)
class KeyRecord:
    """A stored key: never the key itself."""

    id: str
    key_hash: str
    role: Role
    tenant: str | None
    label: str
    created_at: float
    revoked_at: float | None = None

    @property
    def principal(self) -> Principal:
        return Principal(self.id, self.role, self.tenant)

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "role": self.role.value,
            "tenant": self.tenant,
            "label": self.label,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
        }


@dataclass(frozen=True)
class NewKey:
    """A key just made: the only moment its secret exists outside the caller."""

    secret: str
    record: KeyRecord


def new_key(role: Role, tenant: str | None, label: str, created_at: float) -> NewKey:
    """A fresh random key for ``role``; an admin key has no tenant, every other key has one."""
    if role is Role.ADMIN:
        if tenant is not None:
            raise ValueError("an admin key belongs to no tenant: it acts on all of them; drop --tenant")
    else:
        if tenant is None:
            raise ValueError(f"a {role.value} key needs a tenant: pass --tenant NAME")
        check_tenant_name(tenant)
    if len(label) > 200:
        raise ValueError(f"a key's label has at most 200 characters, not {len(label)}")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    digest = hash_key(secret)
    return NewKey(secret, KeyRecord(key_id(digest), digest, role, tenant, label, created_at))
