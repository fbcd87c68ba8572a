"""``/admin/keys`` and ``/admin/tenants``: making, listing and revoking API keys, and tenants' quotas.

Only admin keys get here: :class:`~ember.gateway.auth.AuthMiddleware` refuses every other key with
403 before routing. A new key's secret is in the answer to ``POST /admin/keys`` and nowhere else.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ember.auth.keys import Role, check_tenant_name
from ember.auth.quota import TenantQuota
from ember.errors import InvalidInput
from ember.gateway.auth import Guard
from ember.gateway.edge import read_json

__all__ = ["routes"]


def routes(guard: Guard) -> list[Route]:
    async def list_keys(request: Request) -> Response:
        revoked = request.query_params.get("revoked", "false") == "true"
        return JSONResponse([k.to_json() for k in guard.api_keys(include_revoked=revoked)])

    async def create_key(request: Request) -> Response:
        body = await read_json(request, limit=64 * 1024)
        if not isinstance(body, dict) or not isinstance(body.get("role"), str):
            raise InvalidInput('the body must be a JSON object like {"role": "invoker", "tenant": "acme"}')
        try:
            role = Role(body["role"])
        except ValueError:
            raise InvalidInput(f"role must be admin, deployer or invoker, not {body['role']!r}") from None
        tenant, label = body.get("tenant"), body.get("label", "")
        if (tenant is not None and not isinstance(tenant, str)) or not isinstance(label, str):
            raise InvalidInput("'tenant' and 'label' must be strings")
        try:
            made = guard.create_key(role, tenant, label)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc
        return JSONResponse({"key": made.secret, **made.record.to_json()}, status_code=201)

    async def revoke_key(request: Request) -> Response:
        key_id = request.path_params["key_id"]
        guard.revoke_key(key_id)
        return JSONResponse({"revoked": key_id})

    async def list_tenants(request: Request) -> Response:
        return JSONResponse([q.to_json() for q in guard.quotas()])

    async def set_tenant(request: Request) -> Response:
        name = request.path_params["tenant"]
        body = await read_json(request, limit=64 * 1024)
        if not isinstance(body, dict):
            raise InvalidInput('the body must be a JSON object like {"rate_per_s": 100, "max_models": 10}')
        fields = {"rate_per_s", "burst", "max_models", "max_bytes", "max_instances"}
        unknown = sorted(set(body) - fields)
        if unknown:
            raise InvalidInput(f"unknown quota field(s) {', '.join(unknown)}; use {', '.join(sorted(fields))}")
        for field, value in body.items():
            kind = (int, float) if field == "rate_per_s" else (int,)
            if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
                what = "a number" if field == "rate_per_s" else "an integer"
                raise InvalidInput(f"quota '{field}' must be {what} or null, not {value!r}")
        try:
            quota = TenantQuota(check_tenant_name(name), **body)
        except (ValueError, TypeError) as exc:
            raise InvalidInput(str(exc)) from exc
        guard.set_quota(quota)
        return JSONResponse(quota.to_json())

    return [
        Route("/admin/keys", list_keys, methods=["GET"]),
        Route("/admin/keys", create_key, methods=["POST"]),
        Route("/admin/keys/{key_id}", revoke_key, methods=["DELETE"]),
        Route("/admin/tenants", list_tenants, methods=["GET"]),
        Route("/admin/tenants/{tenant}", set_tenant, methods=["PUT"]),
    ]
