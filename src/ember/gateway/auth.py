"""Who may call what: the key check on every request, tenant namespaces and scoping, quotas.

:class:`Guard` holds every live key's hash and the principal it stands for, and one token bucket per
tenant with a rate quota. :class:`AuthMiddleware` runs it before any route: a dict lookup of the
presented key's SHA-256 (or of the key itself, once seen), a path classification, a dict lookup of
the model's tenant and a token bucket; ``benchmarks/auth_overhead.py`` measures what that costs.

Rules, in order:

1. Headers over :data:`MAX_HEADER_BYTES` are refused (431), before anything else is read.
2. Health checks, the OpenAPI schema and the dashboard's page and static files are public. Every
   other route needs a key, sent as ``Authorization: Bearer <key>`` (what the openai client sends,
   and what tritonclient sends when given ``headers=``) or ``X-API-Key: <key>``; none or a wrong
   one is 401, and several of either header is 400 (servers and proxies disagree on which one
   counts). With ``--insecure`` (on loopback only) a request without a known key acts as admin; a
   known key still acts as itself.
3. Model names are per tenant: a key of ``acme`` naming ``m`` names ``acme+m`` (the path is
   rewritten before routing), so it cannot even name another tenant's model, and deploying a name
   another tenant uses is no clash. A route naming a model of another tenant (possible for keys of
   the default tenant, whose names are plain) answers 404, word for word what an absent model gets.
   Lists show only the caller's tenant.
4. Then the role: keys and tenants, status and metrics are admin's (403 otherwise); usage and the
   dashboard's data are anyone's, scoped to the caller's tenant; deploy, remove,
   load and unload need deployer; calling and reading need invoker. ``GET /metrics`` also takes the
   metrics key of ``HOME/metrics.key``, which opens nothing else (for a Prometheus scraper).
5. A call (infer, generate, embeddings, chat and completions) takes a token from its tenant's
   bucket, or is refused with 429 and ``Retry-After``.

Routes that take a model name from the body (``/v1/embeddings``, ``/v1/chat/completions``,
``/v1/completions``) call :func:`check_model` themselves.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from enum import Enum
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from ember.auth.keyfile import ensure_admin_key, ensure_metrics_key
from ember.auth.keys import (
    DEFAULT_TENANT,
    TENANT_SEPARATOR,
    KeyRecord,
    NewKey,
    Principal,
    Role,
    hash_key,
    new_key,
    qualify,
)
from ember.auth.quota import TenantQuota, TokenBucket
from ember.clock import Clock
from ember.config import DeploySpec
from ember.errors import (
    EmberError,
    Forbidden,
    InvalidInput,
    ModelNotFound,
    QuotaExceeded,
    TooLarge,
    Unauthorized,
)
from ember.gateway.connections import CONNECTION_SCOPE_KEY
from ember.gateway.edge import error_response
from ember.registry import Registry

__all__ = [
    "MAX_HEADER_BYTES",
    "AuthMiddleware",
    "Guard",
    "Reservation",
    "admit_deploy",
    "check_model",
    "principal_of",
    "qualified",
    "visible",
]

#: All request headers together, names and values.
MAX_HEADER_BYTES = 16 * 1024
#: Live keys remembered as sent (see ``Guard._seen``).
SEEN_KEYS = 4096
#: (tenant, method, path) classifications remembered (see ``AuthMiddleware._route``).
ROUTES_REMEMBERED = 4096

PUBLIC_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/openapi.json", "/"})
#: Paths under this prefix are public too: the dashboard's script, styles and charting library.
PUBLIC_PREFIX = "/static/"

#: What an unauthenticated caller of a ``--insecure`` server is.
LOCAL_ADMIN = Principal("insecure", Role.ADMIN, None)


class Action(Enum):
    READ = "read"
    INVOKE = "invoke"
    DEPLOY = "deploy"
    ADMIN = "admin"


class Guard:
    """The live keys and the tenants' quotas, in memory; changed only through its methods."""

    def __init__(self, registry: Registry, clock: Clock, home: Path, insecure: bool = False) -> None:
        self._registry = registry
        self._clock = clock
        self.insecure = insecure
        #: The admin key this start made (and wrote to the home's key file), or None.
        self.made_admin_key: NewKey | None = ensure_admin_key(home, registry, clock.wall())
        self._metrics_key = ensure_metrics_key(home).encode()
        self._principals: dict[str, Principal] = {}
        #: Keys presented lately that are live, as sent: skips the hash on the next request with one.
        #: Cleared on every revocation; only valid keys enter, so a flood of wrong keys cannot grow it.
        self._seen: dict[bytes, Principal] = {}
        self._quotas: dict[str, TenantQuota] = {}
        self._buckets: dict[str, TokenBucket] = {}
        #: Deploys in flight per tenant, counted against its quotas until they end.
        self._reserved: dict[str, set[Reservation]] = {}
        self.reload()

    def reload(self) -> None:
        """Read keys and quotas again from the registry (after another process changed them)."""
        self._principals = {k.key_hash: k.principal for k in self._registry.api_keys()}
        self._seen = {}
        self._quotas = {q.tenant: q for q in self._registry.quotas()}
        self._buckets = {}

    # -- per request -------------------------------------------------------------------------------

    def is_metrics_key(self, key: bytes) -> bool:
        """Whether ``key`` is the home's metrics key (good for ``GET /metrics`` alone)."""
        return hmac.compare_digest(key, self._metrics_key)

    def authenticate(self, key: bytes | None) -> Principal:
        if key is not None:
            principal = self._seen.get(key)
            if principal is not None:
                return principal
            principal = self._principals.get(hash_key(key))
            if principal is not None:
                if len(self._seen) >= SEEN_KEYS:
                    self._seen.clear()
                self._seen[key] = principal
                return principal
            if self.insecure:  # e.g. a client that sent a key of another home: keys are not needed here
                return LOCAL_ADMIN
            raise Unauthorized("the API key is not valid (mistyped, or revoked); `ember keys ls` lists the live keys")
        if self.insecure:
            return LOCAL_ADMIN
        raise Unauthorized(
            "this request needs an API key: send 'Authorization: Bearer <key>'. The server's admin key is in "
            "admin.key in its home; `ember keys create` makes keys for tenants"
        )

    def admit(self, tenant: str) -> None:
        """Take one request from ``tenant``'s rate quota, or refuse with the wait."""
        bucket = self._buckets.get(tenant)
        if bucket is None:
            quota = self._quotas.get(tenant)
            made = None if quota is None else quota.bucket(self._clock.now())
            if made is None:
                return
            bucket = self._buckets[tenant] = made
        wait_s = bucket.take(self._clock.now())
        if wait_s > 0.0:
            raise QuotaExceeded(
                f"tenant '{tenant}' is over its rate quota of {bucket.rate_per_s:g} requests/s "
                f"(burst {bucket.burst:g}); retry after the Retry-After seconds, or ask an admin for more",
                retry_after_s=wait_s,
            )

    # -- keys and tenants --------------------------------------------------------------------------

    def api_keys(self, include_revoked: bool = False) -> list[KeyRecord]:
        return self._registry.api_keys(include_revoked)

    def create_key(self, role: Role, tenant: str | None, label: str = "") -> NewKey:
        made = new_key(role, tenant, label, self._clock.wall())
        self._registry.add_key(made.record)
        self._principals[made.record.key_hash] = made.record.principal
        return made

    def revoke_key(self, key_id: str) -> None:
        if not self._registry.revoke_key(key_id, self._clock.wall()):
            raise InvalidInput(f"there is no live key with id '{key_id}'; `ember keys ls` lists them")
        self._principals = {h: p for h, p in self._principals.items() if p.key_id != key_id}
        self._seen = {}

    def set_quota(self, quota: TenantQuota) -> None:
        self._registry.set_quota(quota)
        self._quotas[quota.tenant] = quota
        self._buckets.pop(quota.tenant, None)

    def quota(self, tenant: str) -> TenantQuota:
        return self._quotas.get(tenant) or TenantQuota(tenant)

    def quotas(self) -> list[TenantQuota]:
        return sorted(self._quotas.values(), key=lambda q: q.tenant)

    def reserve_deploy(self, spec: DeploySpec, models: Callable[[], Iterable[Any]]) -> Reservation:
        """Count a deploy against its tenant's quotas from now until the reservation is released.

        Refuses (429) a deploy that would put the tenant over ``max_models`` or ``max_instances``, or
        whose tenant already holds ``max_bytes``; deploys in flight count as deployed models, so
        concurrent deploys cannot all pass the same check. ``models()`` lists the deployed models
        (``ModelInfo``); the check and the reservation happen without a pause in between.
        """
        tenant = str(spec.tenant)
        reservation = Reservation(self, tenant, str(spec.name), spec.max_instances, models)
        self._check_models(reservation, models())
        self._reserved.setdefault(tenant, set()).add(reservation)
        return reservation

    def _check_models(self, new: Reservation, models: Iterable[Any]) -> None:
        tenant = new.tenant
        quota = self._quotas.get(tenant)
        if quota is None:
            return
        owned, pending = self._holdings(new, models)
        count = len(owned) + len(pending)
        if quota.max_models is not None and count >= quota.max_models:
            raise QuotaExceeded(
                f"tenant '{tenant}' has {_models_phrase(len(owned), len(pending))}, its quota (max_models "
                f"{quota.max_models}); remove one first",
                retry_after_s=60.0,
            )
        self._check_bytes(new, owned, pending, with_new=False)
        instances = sum(int(m.max_instances) for m in owned) + sum(r.max_instances for r in pending) + new.max_instances
        if quota.max_instances is not None and instances > quota.max_instances:
            raise QuotaExceeded(
                f"tenant '{tenant}' models would run up to {instances} instances, over its quota (max_instances "
                f"{quota.max_instances}); deploy with a lower --max-instances, or remove a model first",
                retry_after_s=60.0,
            )

    def _holdings(self, new: Reservation, models: Iterable[Any]) -> tuple[list[Any], list[Reservation]]:
        """The tenant's deployed models, and its other deploys in flight (a deploy that has just ended
        counts once, as a model)."""
        owned = [m for m in models if m.tenant == new.tenant]
        names = {m.name for m in owned}
        pending = [r for r in self._reserved.get(new.tenant, ()) if r is not new and r.name not in names]
        return owned, pending

    def _check_bytes(self, new: Reservation, owned: list[Any], pending: list[Reservation], with_new: bool) -> None:
        quota = self._quotas.get(new.tenant)
        if quota is None or quota.max_bytes is None:
            return
        used = sum(int(m.bytes) for m in owned) + sum(r.bytes for r in pending)
        if used >= quota.max_bytes:
            raise QuotaExceeded(
                f"tenant '{new.tenant}' models hold {used} bytes, its quota (max_bytes {quota.max_bytes}); "
                "remove one first",
                retry_after_s=60.0,
            )
        if with_new and used + new.bytes > quota.max_bytes:
            raise QuotaExceeded(
                f"the model's weights are {new.bytes} bytes; with the {used} bytes tenant '{new.tenant}' holds "
                f"that is over its quota (max_bytes {quota.max_bytes}); remove a model first",
                retry_after_s=60.0,
            )


def _models_phrase(deployed: int, deploying: int) -> str:
    phrase = f"{deployed} models deployed"
    return phrase if not deploying else f"{phrase} and {deploying} being deployed"


class Reservation:
    """A deploy in flight, counted against its tenant's quotas (see :meth:`Guard.reserve_deploy`)."""

    def __init__(
        self, guard: Guard, tenant: str, name: str, max_instances: int, models: Callable[[], Iterable[Any]]
    ) -> None:
        self._guard = guard
        self._models = models
        self.tenant = tenant
        self.name = name
        self.max_instances = max_instances
        #: The model's stored bytes, once known (:meth:`stored`).
        self.bytes = 0

    def stored(self, size: int) -> None:
        """The weights are stored: refuse (and so roll back) the deploy if they put the tenant over
        ``max_bytes``, counting the other deploys in flight."""
        self.bytes = size
        try:
            self._guard._check_bytes(self, *self._guard._holdings(self, self._models()), with_new=True)
        except QuotaExceeded:
            self.bytes = 0  # refused: it will hold nothing
            raise

    def release(self) -> None:
        """The deploy has ended (deployed or not): from now its model counts only if it is deployed."""
        self._guard._reserved.get(self.tenant, set()).discard(self)


#: Admin routes any key may read: each answers with the caller's tenant's part alone.
TENANT_SCOPED_PATHS = frozenset({"/admin/usage", "/admin/dashboard"})


#: The ends of the ``/v2/models/...`` paths that call a model (the rest read about it).
_CALLS = ("/infer", "/generate", "/generate_stream")


def _classify(method: str, path: str) -> tuple[Action, int]:
    """What a request does, and which segment of its path (split on '/') names a model (0: none)."""
    if path.startswith("/v2/models/"):
        return (Action.INVOKE if method == "POST" and path.endswith(_CALLS) else Action.READ), 3
    if path.startswith("/v2/repository/models/"):
        return Action.DEPLOY, 4
    if path.startswith("/admin/models"):
        return (Action.READ if method in ("GET", "HEAD") else Action.DEPLOY), 3
    if path.startswith("/v1/"):
        if path.startswith("/v1/models/"):
            return Action.READ, 3
        return (Action.READ if method in ("GET", "HEAD") else Action.INVOKE), 0
    if path in TENANT_SCOPED_PATHS:
        return Action.READ, 0
    if path.startswith("/admin/") or path == "/metrics":
        return Action.ADMIN, 0
    return Action.READ, 0


class AuthMiddleware:
    """Runs the :class:`Guard` before any route; answers refusals itself, as every route would."""

    def __init__(self, app: ASGIApp, guard: Guard, tenant_of: Any) -> None:
        self.app = app
        self.guard = guard
        #: name -> the model's tenant, or None when no such model is deployed.
        self.tenant_of = tenant_of
        self._routes: dict[tuple[str | None, str, str], tuple[Action, str | None, str | None]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self._check(scope)
        except EmberError as exc:
            response = error_response(exc, openai=scope["path"].startswith("/v1/"))
            if isinstance(exc, Unauthorized):
                response.headers["WWW-Authenticate"] = 'Bearer realm="ember"'
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _route(self, tenant: str | None, method: str, path: str) -> tuple[Action, str | None, str | None]:
        """What the request does, the model a tenant key names (in its namespace), and the path to route
        if the name changed; remembered, as requests repeat the same few paths."""
        action, segment = _classify(method, path)
        model = rewritten = None
        if segment and tenant is not None:
            parts = path.split("/")
            if len(parts) > segment and parts[segment]:
                model = qualify(tenant, parts[segment])
                if model != parts[segment]:
                    parts[segment] = model
                    rewritten = "/".join(parts)
        if len(self._routes) >= ROUTES_REMEMBERED:
            self._routes.clear()
        self._routes[(tenant, method, path)] = route = (action, model, rewritten)
        return route

    def _check(self, scope: Scope) -> None:
        bearer: bytes | None = None
        api_key: bytes | None = None
        repeated: str | None = None
        size = 0
        for name, value in scope["headers"]:
            size += len(name) + len(value)
            if name == b"authorization":
                if bearer is not None:
                    repeated = "Authorization"
                scheme, _, token = value.partition(b" ")
                bearer = token.strip() if scheme.lower() == b"bearer" else value
            elif name == b"x-api-key":
                if api_key is not None:
                    repeated = "X-API-Key"
                api_key = value.strip()
        if size > MAX_HEADER_BYTES:
            raise TooLarge(f"the request headers are {size} bytes; the limit is {MAX_HEADER_BYTES} bytes", 431)
        path: str = scope["path"]
        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIX):
            return
        if repeated is not None:  # which one a proxy or a server would pick differs: pick none
            raise InvalidInput(f"the request has several {repeated} headers; send the API key in one")
        key = bearer if bearer is not None else api_key
        if key is not None and self.guard.is_metrics_key(key):
            if path == "/metrics":
                return
            raise Forbidden(f"the metrics key (metrics.key) opens GET /metrics alone, not {path}; send an API key")
        principal = self.guard.authenticate(key)
        scope["ember.principal"] = principal
        connection = scope.get(CONNECTION_SCOPE_KEY)
        if connection is not None:  # a keyed connection is no longer capped (ember.gateway.connections)
            connection.authenticated()
        route = self._routes.get((principal.tenant, scope["method"], path))
        if route is None:
            route = self._route(principal.tenant, scope["method"], path)
        action, model, rewritten = route
        if rewritten is not None:  # the route sees the name in the caller's namespace
            scope["path"] = rewritten
            # Routing reads "path"; "raw_path" only has to agree (names are ASCII; junk is refused later).
            scope["raw_path"] = rewritten.encode("utf-8", "surrogateescape")
        if model is not None and self.tenant_of(model) != principal.tenant:
            # Before the role check: an absent model and another tenant's get the same answer.
            raise ModelNotFound(model)
        if action is Action.ADMIN and not principal.is_admin:
            raise Forbidden(f"{path} is for admin keys; this key is a {principal.role.value} key")
        if action is Action.DEPLOY and not principal.can_deploy:
            raise Forbidden(
                f"an invoker key may call models but not change them; {scope['method']} {path} needs a deployer key"
            )
        if action is Action.INVOKE and principal.tenant is not None:
            self.guard.admit(principal.tenant)


# -- for routes --------------------------------------------------------------------------------------


def principal_of(request: Request) -> Principal:
    principal = request.scope.get("ember.principal")
    return principal if isinstance(principal, Principal) else LOCAL_ADMIN


def visible(request: Request, tenant: str) -> bool:
    """Whether the caller may see a model of ``tenant`` (filter lists with it)."""
    return principal_of(request).sees(tenant)


def qualified(request: Request, name: str) -> str:
    """For routes that read a model name from the body: the name in the caller's namespace."""
    return qualify(principal_of(request).tenant, name)


def check_model(request: Request, name: str, tenant: str) -> None:
    """For routes that read a model name from the body: another tenant's model is not there."""
    if not principal_of(request).sees(tenant):
        raise ModelNotFound(name)


def scope_spec(request: Request, spec: DeploySpec) -> DeploySpec:
    """The spec with its tenant settled and its name in that tenant's namespace.

    A deployer's tenant is its own; an admin's is the spec's ``tenant``, or the one a qualified name
    (``acme+m``) says, or the default tenant.
    """
    principal = principal_of(request)
    name = str(spec.name)
    prefix, separator, _ = name.rpartition(TENANT_SEPARATOR)
    if principal.tenant is None:
        tenant = spec.tenant or (prefix if separator else DEFAULT_TENANT)
    else:
        if spec.tenant not in (None, principal.tenant):
            raise Forbidden(f"a key of tenant '{principal.tenant}' deploys only into '{principal.tenant}'")
        tenant = principal.tenant
    if separator and prefix != tenant:
        raise InvalidInput(f"model name '{name}' is in tenant '{prefix}', not '{tenant}'; name it without a prefix")
    return spec.model_copy(update={"tenant": tenant, "name": qualify(tenant, name)})


def admit_deploy(
    request: Request, spec: DeploySpec, models: Callable[[], Iterable[Any]]
) -> tuple[DeploySpec, Reservation | None]:
    """The spec scoped to the caller's tenant (:func:`scope_spec`), and its reservation of the tenant's
    model quotas (:meth:`Guard.reserve_deploy`); release it when the deploy ends."""
    scoped = scope_spec(request, spec)
    guard = getattr(request.app.state, "guard", None)
    if isinstance(guard, Guard):
        return scoped, guard.reserve_deploy(scoped, models)
    return scoped, None
