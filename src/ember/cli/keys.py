"""``ember keys ...`` and ``ember tenants ...``: API keys and tenants' quotas, through the admin API.

    ember keys create --role invoker --tenant acme [--label ci]   print a new key (shown once)
    ember keys ls [--all] [--json]                                the keys: id, role, tenant, label
    ember keys revoke ID                                          the key stops working at once
    ember tenants set NAME [--rate-per-s R] [--burst B] [--max-models N] [--max-bytes N]
    ember tenants ls [--json]

They need an admin key: ``EMBER_API_KEY``, or the admin key file of ``EMBER_HOME`` (default
``~/.ember``) on the server's own machine.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ember.auth.keys import Role
from ember.cli.common import DEFAULT_HOME, HomeOption, UrlOption, console, errors, print_table
from ember.client import DEFAULT_URL, Client

__all__ = ["keys_app", "tenants_app"]

keys_app = typer.Typer(name="keys", help="Create, list and revoke API keys (admin only).", no_args_is_help=True)
tenants_app = typer.Typer(name="tenants", help="Set and list tenants' quotas (admin only).", no_args_is_help=True)


@keys_app.command("create")
def create(
    role: Annotated[Role, typer.Option(help="admin, deployer (deploy/remove in its tenant) or invoker (call).")],
    tenant: Annotated[str | None, typer.Option(help="The key's tenant (every role but admin needs one).")] = None,
    label: Annotated[str, typer.Option(help="A note to tell keys apart in `ember keys ls`.")] = "",
    url: UrlOption = DEFAULT_URL,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Make a key and print it; Ember keeps only its hash, so this is the one time it is shown."""
    body: dict[str, Any] = {"role": role.value, "tenant": tenant, "label": label}
    with errors(url), Client(url, home=home) as client:
        made = client.request_json("POST", "/admin/keys", body)
    typer.echo(made["key"])
    where = f"tenant {made['tenant']}" if made["tenant"] else "all tenants"
    Console(stderr=True).print(
        f"{made['role']} key {made['id']} for {where}; send it as 'Authorization: Bearer <key>'", highlight=False
    )


@keys_app.command("ls")
def list_keys(
    include_revoked: Annotated[bool, typer.Option("--all", help="Show revoked keys too.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    url: UrlOption = DEFAULT_URL,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """List the keys (never the keys themselves: ids, roles, tenants, labels)."""
    path = "/admin/keys?revoked=true" if include_revoked else "/admin/keys"
    with errors(url), Client(url, home=home) as client:
        keys: list[dict[str, Any]] = client.request_json("GET", path)
    if as_json:
        typer.echo(json.dumps(keys, indent=2))
        return
    table = Table(box=None, header_style="bold")
    for header in ("id", "role", "tenant", "label", "created", "revoked"):
        table.add_column(header)
    for k in keys:
        table.add_row(
            k["id"], k["role"], k["tenant"] or "*", k["label"], _when(k["created_at"]), _when(k["revoked_at"])
        )
    print_table(table)


@keys_app.command("revoke")
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id, from `ember keys ls`.")],
    url: UrlOption = DEFAULT_URL,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Revoke a key: the next request with it is refused (401)."""
    with errors(url), Client(url, home=home) as client:
        client.request_json("DELETE", f"/admin/keys/{key_id}")
    console.print(f"revoked {key_id}", highlight=False)


@tenants_app.command("set")
def set_tenant(
    name: str,
    rate_per_s: Annotated[
        float | None, typer.Option(min=0.001, help="Requests per second (default: no limit).")
    ] = None,
    burst: Annotated[int | None, typer.Option(min=1, help="Requests at once above the rate.")] = None,
    max_models: Annotated[int | None, typer.Option(min=0, help="Models the tenant may deploy.")] = None,
    max_bytes: Annotated[int | None, typer.Option(min=0, help="Stored weight bytes of its models together.")] = None,
    max_instances: Annotated[
        int | None, typer.Option(min=0, help="Instances its models may run at once (the sum of their max_instances).")
    ] = None,
    url: UrlOption = DEFAULT_URL,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Set a tenant's quotas (each one not given is unlimited)."""
    body = {
        "rate_per_s": rate_per_s,
        "burst": burst,
        "max_models": max_models,
        "max_bytes": max_bytes,
        "max_instances": max_instances,
    }
    with errors(url), Client(url, home=home) as client:
        quota = client.request_json("PUT", f"/admin/tenants/{name}", body)
    console.print(f"tenant {name}: {_quota_text(quota)}", highlight=False)


@tenants_app.command("ls")
def list_tenants(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    url: UrlOption = DEFAULT_URL,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """List the tenants that have quotas."""
    with errors(url), Client(url, home=home) as client:
        quotas: list[dict[str, Any]] = client.request_json("GET", "/admin/tenants")
    if as_json:
        typer.echo(json.dumps(quotas, indent=2))
        return
    for quota in quotas:
        console.print(f"{quota['tenant']}: {_quota_text(quota)}", highlight=False)


def _quota_text(quota: dict[str, Any]) -> str:
    parts = [
        f"{k} {quota[k]:g}"
        for k in ("rate_per_s", "burst", "max_models", "max_bytes", "max_instances")
        if quota.get(k) is not None
    ]
    return ", ".join(parts) or "no limits"


def _when(seconds: float | None) -> str:
    return "-" if seconds is None else datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M")
