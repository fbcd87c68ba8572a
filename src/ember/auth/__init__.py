"""Who may do what: tenants, API keys with roles, and per-tenant quotas.

Pure data and arithmetic: the gateway (``ember.gateway.auth``) applies them on every request, the
registry stores them, the CLI manages them. Nothing here does I/O except :mod:`ember.auth.keyfile`.
"""

from ember.auth.keys import (
    ADMIN_KEY_FILE,
    DEFAULT_TENANT,
    KeyRecord,
    NewKey,
    Principal,
    Role,
    check_tenant_name,
    hash_key,
    new_key,
    qualify,
)
from ember.auth.quota import TenantQuota, TokenBucket

__all__ = [
    "ADMIN_KEY_FILE",
    "DEFAULT_TENANT",
    "KeyRecord",
    "NewKey",
    "Principal",
    "Role",
    "TenantQuota",
    "TokenBucket",
    "check_tenant_name",
    "hash_key",
    "new_key",
    "qualify",
]
