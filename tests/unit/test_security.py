"""Tenants, keys and roles on every route, in process, on fake workers.

Two tenants, ``acme`` (model ``acme+a``, which its keys call ``a``) and ``globex`` (``globex+g``),
a key of each role, and an invoker of the default tenant. Every route is called with each key: a key
of another tenant gets exactly the 404 an absent model gets.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import sqlite3
import stat
import tarfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from ember import packaging
from ember.auth.keys import ADMIN_KEY_FILE, Role
from ember.clock import VirtualClock
from ember.config import DeploySpec, resolve_source
from ember.errors import InvalidInput
from ember.gateway.app import build_app
from ember.gateway.auth import MAX_HEADER_BYTES, Guard
from ember.packaging import PACKAGE_MEDIA_TYPE, SPEC_HEADER, pack
from ember.registry import Registry
from ember.registry.sqlite import SCHEMA_VERSION
from ember.service import EmberService, ServeOptions
from ember.testing import FakeBackend, run_in_virtual_time

INFER = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1.0, 2.0, 3.0, 4.0]}]}


@dataclass
class World:
    client: httpx.AsyncClient
    clock: VirtualClock
    guard: Guard
    service: EmberService
    keys: dict[str, str | None]
    model_file: Path

    async def call(
        self,
        who: str,
        method: str,
        path: str,
        body: object = None,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response:
        key = self.keys[who]
        sent = dict(headers or {}) if key is None else {**(headers or {}), "Authorization": f"Bearer {key}"}
        if body is not None:
            content = json.dumps(body).encode()
        return await self.client.request(method, path, content=content, headers=sent)

    async def deploy(self, who: str, body: dict[str, object]) -> httpx.Response:
        """``POST /admin/models`` as ``ember deploy`` sends it: the model packed, the deployment in a header."""
        package = pack(str(body["source"]))
        assert package is not None
        try:
            spec = json.dumps({**body, "source": package.source})
            headers = {"Content-Type": PACKAGE_MEDIA_TYPE, SPEC_HEADER: spec}
            return await self.call(who, "POST", "/admin/models", headers=headers, content=package.file.read_bytes())
        finally:
            package.remove()


def with_world(
    tmp_path: Path, test: Callable[[World], Awaitable[None]], insecure: bool = False, workers: int = 2
) -> None:
    model = tmp_path / "model.py"
    model.write_text("class M: ...\n")

    async def main(clock: VirtualClock) -> None:
        backend = FakeBackend(clock, size=workers)  # a worker per tenant: they never share one
        options = ServeOptions(home=tmp_path / "home", warm_root=tmp_path / "shm", insecure=insecure)
        service = EmberService(options, clock=clock, backend=backend)
        async with service:
            await service.deploy(DeploySpec(source=f"{model}:M", name="acme+a", tenant="acme"))
            await service.deploy(DeploySpec(source=f"{model}:M", name="globex+g", tenant="globex"))
            app = build_app(service, manage_lifetime=False)
            guard = app.state.guard
            keys: dict[str, str | None] = {
                "admin": (tmp_path / "home" / ADMIN_KEY_FILE).read_text().strip(),
                "deployer": guard.create_key(Role.DEPLOYER, "acme").secret,
                "invoker": guard.create_key(Role.INVOKER, "acme").secret,
                "other_deployer": guard.create_key(Role.DEPLOYER, "globex").secret,
                "other_invoker": guard.create_key(Role.INVOKER, "globex").secret,
                "default_invoker": guard.create_key(Role.INVOKER, "default").secret,
                "none": None,
                "wrong": "ember_" + "x" * 43,
            }
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://ember") as client:
                await test(World(client, clock, guard, service, keys, model))

    run_in_virtual_time(main)


# Every route that names a model, and what it needs: read, invoke or deploy. {m} is the model.
MODEL_ROUTES = [
    ("GET", "/v2/models/{m}", None, "read"),
    ("GET", "/v2/models/{m}/versions/1", None, "read"),
    ("GET", "/v2/models/{m}/ready", None, "read"),
    ("GET", "/v2/models/{m}/config", None, "read"),
    ("GET", "/v2/models/{m}/versions/1/config", None, "read"),
    ("POST", "/v2/models/{m}/infer", INFER, "invoke"),
    ("POST", "/v2/models/{m}/versions/1/infer", INFER, "invoke"),
    ("POST", "/v2/repository/models/{m}/load", {}, "deploy"),
    ("POST", "/v2/repository/models/{m}/unload", {}, "deploy"),
    ("GET", "/v1/models/{m}", None, "read"),
    ("GET", "/admin/models/{m}", None, "read"),
    ("POST", "/admin/models/{m}/load", None, "deploy"),
    ("POST", "/admin/models/{m}/unload", None, "deploy"),
    ("DELETE", "/admin/models/{m}", None, "deploy"),
]

#: The callers in the order each route is tried: refusals first, the one that may remove the model last.
CALLERS = ["none", "wrong", "other_invoker", "other_deployer", "default_invoker", "invoker", "admin", "deployer"]
#: How each caller names acme's model: its own keys by the short name, the rest by the full one.
NAMES = {"invoker": "a", "deployer": "a", "other_invoker": "a", "other_deployer": "a"}
ALLOWED = {
    "read": {"invoker", "deployer", "admin"},
    "invoke": {"invoker", "deployer", "admin"},
    "deploy": {"deployer", "admin"},
}


@pytest.mark.parametrize(("method", "template", "body", "needs"), MODEL_ROUTES, ids=lambda v: str(v)[:40])
def test_every_model_route_with_every_role_and_another_tenants_key(tmp_path, method, template, body, needs):
    async def test(world: World) -> None:
        for who in CALLERS:
            if method == "DELETE" and who == "admin":
                continue  # the deployer removes it last; admin's DELETE is covered on its own below
            name = NAMES.get(who, "acme+a")
            r = await world.call(who, method, template.format(m=name), body)
            if who in ("none", "wrong"):
                assert r.status_code == 401, (who, r.text)
                error = r.json()["error"]
                assert "API key" in (error["message"] if isinstance(error, dict) else error)
                assert r.headers["www-authenticate"].startswith("Bearer")
            elif who.startswith(("other_", "default_")):
                # Word for word what the same key gets for a model nobody deployed.
                absent = await world.call(who, method, template.format(m=name + "zzz"), body)
                assert r.status_code == absent.status_code == 404
                assert r.json() == json.loads(absent.text.replace("zzz", "")), (who, r.text)
            elif who in ALLOWED[needs]:
                assert r.status_code == 200, (who, r.text)
            else:
                assert r.status_code == 403, (who, r.text)
                assert "deployer key" in r.json()["error"]
        assert world.service.tenant_of("globex+g") == "globex"  # the other tenant's model was never touched
        if method != "DELETE":  # an acme key may use the full name too
            full = await world.call("invoker", method, template.format(m="acme+a"), body)
            assert full.status_code == (403 if needs == "deploy" else 200)

    with_world(tmp_path, test)


def test_admin_removes_any_tenants_model(tmp_path):
    async def test(world: World) -> None:
        assert (await world.call("admin", "DELETE", "/admin/models/globex+g")).status_code == 200
        assert (await world.call("other_invoker", "GET", "/v2/models/g")).status_code == 404

    with_world(tmp_path, test)


@pytest.mark.parametrize(
    ("method", "path", "names"),
    [
        ("GET", "/admin/models", lambda body: [m["name"] for m in body]),
        ("GET", "/v1/models", lambda body: [m["id"] for m in body["data"]]),
        ("POST", "/v2/repository/index", lambda body: [m["name"] for m in body]),
    ],
)
def test_lists_show_only_the_callers_tenant(tmp_path, method, path, names):
    async def test(world: World) -> None:
        seen = {}
        for who in ("admin", "deployer", "invoker", "other_invoker", "default_invoker"):
            r = await world.call(who, method, path)
            assert r.status_code == 200, r.text
            seen[who] = names(r.json())
        assert seen == {
            "admin": ["acme+a", "globex+g"],
            "deployer": ["acme+a"],
            "invoker": ["acme+a"],
            "other_invoker": ["globex+g"],
            "default_invoker": [],
        }
        assert (await world.call("none", method, path)).status_code == 401

    with_world(tmp_path, test)


def test_embeddings_names_the_model_in_the_body_and_hides_other_tenants(tmp_path):
    async def test(world: World) -> None:
        own = await world.call("invoker", "POST", "/v1/embeddings", {"model": "a", "input": "hi"})
        assert own.status_code == 400 and "not an embedding model" in own.json()["error"]["message"]
        for who, name in (("other_invoker", "a"), ("other_invoker", "acme+a"), ("default_invoker", "acme+a")):
            other = await world.call(who, "POST", "/v1/embeddings", {"model": name, "input": "hi"})
            ghost = await world.call(who, "POST", "/v1/embeddings", {"model": name + "zzz", "input": "hi"})
            assert other.status_code == ghost.status_code == 404
            assert other.json()["error"]["message"] == ghost.json()["error"]["message"].replace("zzz", "")
        unauthenticated = await world.call("none", "POST", "/v1/embeddings", {"model": "a", "input": "hi"})
        assert unauthenticated.status_code == 401
        assert unauthenticated.json()["error"]["type"] == "authentication_error"  # what the openai client reads

    with_world(tmp_path, test)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/admin/status", None),
        ("GET", "/metrics", None),
        ("GET", "/admin/keys", None),
        ("POST", "/admin/keys", {"role": "invoker", "tenant": "acme"}),
        ("DELETE", "/admin/keys/000000000000", None),
        ("GET", "/admin/tenants", None),
        ("PUT", "/admin/tenants/acme", {"rate_per_s": 5}),
    ],
)
def test_admin_routes_need_an_admin_key(tmp_path, method, path, body):
    async def test(world: World) -> None:
        for who in ("deployer", "invoker", "other_deployer"):
            r = await world.call(who, method, path, body)
            assert r.status_code == 403 and "admin" in r.json()["error"], (who, r.text)
        for who in ("none", "wrong"):
            assert (await world.call(who, method, path, body)).status_code == 401
        r = await world.call("admin", method, path, body)
        assert r.status_code in (200, 201, 400), r.text  # 400: revoking an id that does not exist
        if r.status_code == 400:
            assert "no live key" in r.json()["error"]

    with_world(tmp_path, test)


def test_health_and_the_schema_need_no_key_but_server_metadata_does(tmp_path):
    async def test(world: World) -> None:
        for path in ("/v2/health/live", "/v2/health/ready", "/"):
            assert (await world.call("none", "GET", path)).status_code == 200, path
        assert (await world.call("none", "GET", "/v2")).status_code == 401
        assert (await world.call("none", "GET", "/no/such/route")).status_code == 401  # routes are not probed
        assert (await world.call("invoker", "GET", "/v2")).status_code == 200

    with_world(tmp_path, test)


def test_deployers_deploy_into_their_own_tenant_only(tmp_path):
    async def test(world: World) -> None:
        source = f"{world.model_file}:M"
        r = await world.deploy("deployer", {"source": source, "name": "b"})
        assert r.status_code == 200 and json.loads(r.text.splitlines()[-1])["model"]["name"] == "acme+b"
        assert world.service.tenant_of("acme+b") == "acme"
        # The same name in another tenant is no clash, so it tells nothing about acme's models.
        r = await world.deploy("other_deployer", {"source": source, "name": "b"})
        assert r.status_code == 200 and world.service.tenant_of("globex+b") == "globex"
        r = await world.deploy("deployer", {"source": source, "name": "b"})
        assert r.status_code == 200 and json.loads(r.text.splitlines()[-1])["status"] == 409  # its own clash
        r = await world.deploy("deployer", {"source": source, "name": "globex+x"})
        assert r.status_code == 400 and "is in tenant 'globex'" in r.json()["error"]
        r = await world.deploy("deployer", {"source": source, "name": "c", "tenant": "globex"})
        assert r.status_code == 403 and "only into 'acme'" in r.json()["error"]
        r = await world.deploy("invoker", {"source": source, "name": "c"})
        assert r.status_code == 403
        # Imported only, on the third worker: the others hold acme's and globex's models.
        r = await world.call("admin", "POST", "/admin/models?load=false", {"source": source, "name": "d"})
        assert r.status_code == 200 and world.service.tenant_of("d") == "default"
        spec = {"source": source, "name": "e", "tenant": "globex"}
        r = await world.call("admin", "POST", "/admin/models?load=false", spec)
        assert r.status_code == 200 and world.service.tenant_of("globex+e") == "globex"
        r = await world.call("admin", "POST", "/admin/models?load=false", {"source": source, "name": "acme+h"})
        assert r.status_code == 200 and world.service.tenant_of("acme+h") == "acme"
        r = await world.call("admin", "POST", "/admin/models", {"source": source, "name": "f", "tenant": "../x"})
        assert r.status_code == 400 and "tenant name" in r.json()["error"]
        assert all(world.service.tenant_of(n) is None for n in ("c", "acme+c", "globex+c", "f", "../x+f"))

    with_world(tmp_path, test, workers=3)


def test_keys_are_made_listed_without_secrets_and_revoked(tmp_path):
    async def test(world: World) -> None:
        r = await world.call("admin", "POST", "/admin/keys", {"role": "invoker", "tenant": "acme", "label": "ci"})
        assert r.status_code == 201
        made = r.json()
        key = made["key"]
        assert key.startswith("ember_") and len(key) >= 40
        world.keys["new"] = key
        assert (await world.call("new", "GET", "/v2/models/a")).status_code == 200
        listed = (await world.call("admin", "GET", "/admin/keys")).json()
        assert made["id"] in [k["id"] for k in listed]
        assert key not in json.dumps(listed) and all("key" not in k and "key_hash" not in k for k in listed)
        assert (await world.call("admin", "DELETE", f"/admin/keys/{made['id']}")).status_code == 200
        r = await world.call("new", "GET", "/v2/models/a")
        assert r.status_code == 401 and "not valid" in r.json()["error"]
        everything = (await world.call("admin", "GET", "/admin/keys?revoked=true")).json()
        assert [k["revoked_at"] is not None for k in everything if k["id"] == made["id"]] == [True]
        for bad in ({"role": "root"}, {"role": "invoker"}, {"role": "admin", "tenant": "acme"}, ["x"]):
            r = await world.call("admin", "POST", "/admin/keys", bad)
            assert r.status_code == 400, bad

    with_world(tmp_path, test)


def test_keys_are_stored_hashed(tmp_path):
    async def test(world: World) -> None:
        home = tmp_path / "home"
        stored = b"".join(p.read_bytes() for p in home.glob("registry.sqlite*"))  # the WAL too
        for who in ("admin", "deployer", "invoker"):
            secret = world.keys[who]
            assert secret is not None and secret.encode() not in stored
        digest = hashlib.sha256(str(world.keys["invoker"]).encode()).hexdigest()
        assert digest.encode() in stored

    with_world(tmp_path, test)


def test_the_admin_key_file_is_the_owners_alone_and_made_once(tmp_path):
    async def test(world: World) -> None:
        path = tmp_path / "home" / ADMIN_KEY_FILE
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        first = path.read_text()
        again = Guard(world.service.registry, world.clock, tmp_path / "home")
        assert again.made_admin_key is None and path.read_text() == first
        path.chmod(0o644)
        with pytest.raises(InvalidInput, match="chmod 600"):
            Guard(world.service.registry, world.clock, tmp_path / "home")

    with_world(tmp_path, test)


def test_insecure_lets_keyless_requests_in_as_admin_and_known_keys_act_as_themselves(tmp_path):
    async def test(world: World) -> None:
        for who in ("none", "wrong"):
            r = await world.call(who, "GET", "/admin/models")
            assert r.status_code == 200 and [m["name"] for m in r.json()] == ["acme+a", "globex+g"]
        assert (await world.call("other_invoker", "GET", "/v2/models/a")).status_code == 404
        assert (await world.call("invoker", "GET", "/admin/status")).status_code == 403

    with_world(tmp_path, test, insecure=True)


def test_a_tenants_request_rate_is_limited_with_retry_after(tmp_path):
    async def test(world: World) -> None:
        r = await world.call("admin", "PUT", "/admin/tenants/acme", {"rate_per_s": 1, "burst": 2})
        assert r.status_code == 200 and r.json()["rate_per_s"] == 1
        statuses = [(await world.call("invoker", "POST", "/v2/models/a/infer", INFER)).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        refused = await world.call("deployer", "POST", "/v2/models/a/infer", INFER)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert "rate quota of 1 requests/s" in refused.json()["error"]
        other = await world.call("other_invoker", "POST", "/v2/models/g/infer", INFER)
        assert other.status_code == 200  # globex has its own bucket (and no quota)
        await world.clock.sleep(1.0)
        assert (await world.call("invoker", "POST", "/v2/models/a/infer", INFER)).status_code == 200
        assert (await world.call("invoker", "GET", "/v2/models/a")).status_code == 200  # reads are not counted

    with_world(tmp_path, test)


def test_a_tenants_model_count_is_limited(tmp_path):
    async def test(world: World) -> None:
        assert (await world.call("admin", "PUT", "/admin/tenants/acme", {"max_models": 1})).status_code == 200
        source = f"{world.model_file}:M"
        r = await world.deploy("deployer", {"source": source, "name": "b"})
        assert r.status_code == 429 and "max_models 1" in r.json()["error"] and "retry-after" in r.headers
        r = await world.deploy("other_deployer", {"source": source, "name": "h"})
        assert r.status_code == 200
        # globex may run 3 instances in all: its model 'g' and 'h' hold 2, so 2 more do not fit.
        assert (await world.call("admin", "PUT", "/admin/tenants/globex", {"max_instances": 3})).status_code == 200
        body = {"source": source, "name": "i", "max_instances": 2}
        r = await world.deploy("other_deployer", body)
        assert r.status_code == 429 and "max_instances 3" in r.json()["error"]
        r = await world.deploy("other_deployer", {**body, "max_instances": 1})
        assert r.status_code == 200
        for bad in ({"rate_per_s": -1}, {"max_models": 1.5}, {"cpu": 3}, {"burst": True}):
            assert (await world.call("admin", "PUT", "/admin/tenants/acme", bad)).status_code == 400, bad
        assert (await world.call("admin", "PUT", "/admin/tenants/Bad..Name", {})).status_code == 400

    with_world(tmp_path, test)


async def _deploy_six_at_once(world: World, **body: object) -> list[str]:
    """Six deploys of acme's deployer at once; the names of those that ended deployed."""
    source = f"{world.model_file}:M"
    names = [f"c{i}" for i in range(6)]
    answers = await asyncio.gather(*(world.deploy("deployer", {"source": source, "name": n, **body}) for n in names))
    done = []
    for name, r in zip(names, answers, strict=True):
        if r.status_code == 200 and json.loads(r.text.splitlines()[-1])["stage"] == "done":
            done.append(name)
        else:  # refused at once, or rolled back at the end of its stream
            assert r.status_code == 429 or json.loads(r.text.splitlines()[-1])["status"] == 429, r.text
    deployed = {m.name for m in world.service.models() if m.tenant == "acme"}
    assert deployed == {"acme+a", *(f"acme+{n}" for n in done)}
    assert world.service.registry.all() == [world.service.registry.get(n) for n in sorted(world.service._runners)]
    return done


@pytest.mark.parametrize(
    ("quota", "body"),
    [({"max_models": 4}, {}), ({"max_instances": 7}, {"max_instances": 2})],
    ids=["max_models", "max_instances"],
)
def test_concurrent_deploys_cannot_pass_the_tenants_quota_together(tmp_path, quota, body):
    async def test(world: World) -> None:
        assert (await world.call("admin", "PUT", "/admin/tenants/acme", quota)).status_code == 200
        # acme holds 'a' (1 instance): 3 more models, or 3 more of 2 instances each, fit.
        assert len(await _deploy_six_at_once(world, **body)) == 3

    with_world(tmp_path, test)


def test_concurrent_deploys_cannot_pass_the_tenants_bytes_together(tmp_path):
    async def test(world: World) -> None:
        size = world.service.info("acme+a").bytes
        assert (await world.call("admin", "PUT", "/admin/tenants/acme", {"max_bytes": 3 * size})).status_code == 200
        assert len(await _deploy_six_at_once(world)) == 2

    with_world(tmp_path, test)


def test_oversized_headers_are_refused_with_431_naming_the_limit(tmp_path):
    async def test(world: World) -> None:
        r = await world.call("invoker", "GET", "/v2/models/a", headers={"x-junk": "j" * (MAX_HEADER_BYTES + 1)})
        assert r.status_code == 431 and f"limit is {MAX_HEADER_BYTES} bytes" in r.json()["error"]

    with_world(tmp_path, test)


def test_keys_are_accepted_as_x_api_key_too(tmp_path):
    async def test(world: World) -> None:
        r = await world.client.get("/v2/models/a", headers={"X-API-Key": str(world.keys["invoker"])})
        assert r.status_code == 200
        r = await world.client.get("/v2/models/a", headers={"Authorization": f"Basic {world.keys['invoker']}"})
        assert r.status_code == 401

    with_world(tmp_path, test)


def test_a_request_with_several_key_headers_is_refused_whichever_comes_last(tmp_path):
    async def test(world: World) -> None:
        good, bad = f"Bearer {world.keys['admin']}", "Bearer ember_" + "x" * 43
        for pair in ((bad, good), (good, bad), (good, good)):
            headers = [("Authorization", pair[0]), ("Authorization", pair[1])]
            r = await world.client.get("/admin/models", headers=headers)
            assert r.status_code == 400 and "several Authorization headers" in r.json()["error"], pair
        headers = [("X-API-Key", str(world.keys["admin"])), ("X-API-Key", str(world.keys["admin"]))]
        assert (await world.client.get("/admin/models", headers=headers)).status_code == 400

    with_world(tmp_path, test)


def test_a_deploy_ends_with_an_error_event_whatever_fails_and_names_must_match_whole(tmp_path):
    async def test(world: World) -> None:
        source = f"{world.model_file}:M"
        for bad in ({"name": "m\n"}, {"name": "acme+m\n"}, {"tenant": "acme\n"}):
            r = await world.call("admin", "POST", "/admin/models", {"source": source, **bad})
            assert r.status_code == 400 and "is not allowed" in r.json()["error"], bad
        assert (await world.call("admin", "PUT", "/admin/tenants/acme%0A", {})).status_code == 400
        workers = world.service.backend.workers()
        for worker in workers:
            worker.described = {"inputs": "not a list of tensors"}  # a bug past the edge: not an EmberError
        r = await world.deploy("deployer", {"source": source, "name": "b"})
        assert r.status_code == 200
        last = json.loads(r.text.splitlines()[-1])
        assert last["stage"] == "error" and last["status"] == 500 and "server log says more" in last["error"], r.text
        for worker in workers:
            worker.described = None
        r = await world.deploy("deployer", {"source": source, "name": "b"})
        assert json.loads(r.text.splitlines()[-1])["stage"] == "done", r.text

    with_world(tmp_path, test)


def test_an_old_home_gains_the_key_tables_and_keeps_its_deployments(tmp_path):
    path = tmp_path / "registry.sqlite"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE deployments (name TEXT PRIMARY KEY, version INTEGER NOT NULL, state TEXT NOT NULL, "
        "spec TEXT NOT NULL, metadata TEXT NOT NULL, created_at REAL NOT NULL);"
        "CREATE TABLE versions (name TEXT PRIMARY KEY, last INTEGER NOT NULL);"
        "INSERT INTO deployments VALUES ('m', 1, 'ready', '{\"source\": \"x.py:M\"}', '{}', 1.0);"
    )
    old.commit()
    old.close()
    registry = Registry(path)
    try:
        assert [r.name for r in registry.all()] == ["m"]
        assert registry.api_keys() == [] and registry.quotas() == []
        assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        registry.close()


def test_models_of_different_tenants_never_share_a_worker(tmp_path):
    async def test(world: World) -> None:
        source = f"{world.model_file}:M"
        for who, name in (("deployer", "a2"), ("other_deployer", "g2")):
            r = await world.deploy(who, {"source": source, "name": name})
            assert r.status_code == 200 and '"done"' in r.text.splitlines()[-1]
        hosting = {w.id: {key.split("@")[0] for key in w.loaded} for w in world.service.backend.workers()}
        tenants = {wid: {world.service.tenant_of(name) for name in names} for wid, names in hosting.items()}
        assert sorted(map(sorted, hosting.values())) == [["acme+a", "acme+a2"], ["globex+g", "globex+g2"]]
        assert all(len(t) == 1 for t in tenants.values())
        # A third tenant finds no worker free of others: refused (503, retryable), never co-located.
        r = await world.call("admin", "POST", "/admin/models", {"source": source, "name": "i", "tenant": "initech"})
        event = json.loads(r.text.splitlines()[-1])
        assert event["stage"] == "error" and "never share a worker" in event["error"]
        assert all("initech+i@1" not in w.loaded for w in world.service.backend.workers())

    with_world(tmp_path, test)


def _nested(depth: int) -> bytes:
    return ('{"inputs": ' + "[" * depth + "1" + "]" * depth + "}").encode()


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "fragment"),
    [
        # A 300 MB body of zeros, gzipped to about 300 KB: decompression stops at the limit.
        ("/v2/models/a/infer", gzip.compress(bytes(300 << 20)), {"Content-Encoding": "gzip"}, 413, "268435456 bytes"),
        ("/v1/embeddings", gzip.compress(bytes(20 << 20)), {"Content-Encoding": "gzip"}, 413, "16777216 bytes"),
        ("/v2/models/a/infer", _nested(100), {}, 400, "nests 101 levels deep; the limit is 64"),
        ("/admin/models", _nested(65), {}, 400, "nests 66 levels deep; the limit is 64"),
        ("/v2/models/a/infer", b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [99999999999], "data": []}]}',
         {}, 400, "over the limit of 67108864 elements"),
        ("/v2/models/a/infer", json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [9, 4],
         "data": [0.0] * 36}]}).encode(), {}, 400, "takes at most 8 per request"),
        ("/admin/models", json.dumps({"source": "m.py:M", "name": "../../etc"}).encode(), {}, 400, "not allowed"),
        ("/admin/models", json.dumps({"source": "m.py:M", "name": "a/b"}).encode(), {}, 400, "not allowed"),
    ],
)  # fmt: skip
def test_edge_limits_answer_4xx_naming_the_limit_and_reach_no_worker(tmp_path, path, body, headers, status, fragment):
    async def test(world: World) -> None:
        batches = sum(len(w.batches) for w in world.service.backend.workers())
        who = "admin" if path == "/admin/models" else "deployer"  # a JSON deploy names a server path: admin only
        sent = {**headers, "Authorization": f"Bearer {world.keys[who]}"}
        r = await world.client.post(path, content=body, headers=sent)
        error = r.json()["error"]
        assert r.status_code == status, r.text
        assert fragment in (error["message"] if isinstance(error, dict) else error)
        assert sum(len(w.batches) for w in world.service.backend.workers()) == batches

    with_world(tmp_path, test)


def test_a_worker_that_ran_one_tenants_code_is_recycled_before_another_tenant_uses_it(tmp_path):
    model = tmp_path / "model.py"
    model.write_text("class M: ...\n")

    async def main(clock: VirtualClock) -> None:
        backend = FakeBackend(clock, size=1)
        options = ServeOptions(home=tmp_path / "home", warm_root=tmp_path / "shm")
        async with EmberService(options, clock=clock, backend=backend) as service:
            await service.deploy(DeploySpec(source=f"{model}:M", name="acme+a", tenant="acme"))
            (first,) = backend.workers()
            await service.remove("acme+a")  # the worker is empty again, but acme's code has run in it
            assert backend.workers() == (first,) and backend.restarts == 0

            await service.deploy(DeploySpec(source=f"{model}:M", name="globex+g", tenant="globex"))

            (second,) = backend.workers()
            assert second is not first and not first.alive
            assert backend.restarts == 1
            assert "globex+g@1" in second.loaded
            # The same tenant again reuses its own worker: no recycling.
            await service.deploy(DeploySpec(source=f"{model}:M", name="globex+h", tenant="globex"))
            assert backend.workers() == (second,) and backend.restarts == 1

    run_in_virtual_time(main)


def test_a_deployer_deploys_only_what_it_uploads_and_learns_nothing_of_server_paths(tmp_path):
    async def test(world: World) -> None:
        stored = next((world.service.home / "code").glob("globex+g@*/model.py"))  # another tenant's code
        answers = []
        for source in (f"{stored}:M", f"{tmp_path}/absent.py:M", f"{world.model_file}:M", "os:getcwd"):
            r = await world.call("deployer", "POST", "/admin/models", {"source": source, "name": "x"})
            assert r.status_code == 403 and "needs an admin key" in r.json()["error"], source
            answers.append(r.content)
        assert len(set(answers)) == 1  # the same answer whether the path exists or not
        for source in ("../model.py:M", "/etc/passwd", f"{world.model_file}:M", "absent.py:M", "os:getcwd"):
            r = await _deploy_package(world, {"model.py": b"class M: ...\n"}, {"source": source})
            assert r.status_code == 400 and "package" in r.json()["error"], (source, r.text)
        r = await _deploy_package(
            world, {"model.py": b"class M: ...\n", "../escaped.py": b""}, {"source": "model.py:M"}
        )
        assert r.status_code == 400 and "outside" in r.json()["error"]
        assert not (world.service.home / "escaped.py").exists()
        r = await _deploy_package(world, {"model.py": b"class M: ...\n"}, {"source": "model.py:M", "package": "/"})
        assert r.status_code == 400
        r = await _deploy_package(world, {"model.py": b"class M: ...\n"}, {"source": "model.py:M", "name": "p"})
        assert json.loads(r.text.splitlines()[-1])["stage"] == "done", r.text
        assert world.service.deployment("acme+p").model_ref.startswith(str(world.service.home / "code" / "acme+p@1"))
        assert list((world.service.home / "uploads").iterdir()) == []  # each package goes when its deploy ends

    with_world(tmp_path, test)


async def _deploy_package(world: World, files: dict[str, bytes], spec: dict[str, object]) -> httpx.Response:
    """A deployer's packaged deploy of a tar holding ``files`` (names as given, even hostile ones)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    headers = {"Content-Type": PACKAGE_MEDIA_TYPE, SPEC_HEADER: json.dumps(spec)}
    return await world.call("deployer", "POST", "/admin/models", headers=headers, content=buffer.getvalue())


def test_options_cannot_move_an_adapters_source_out_of_its_package(tmp_path):
    (tmp_path / "net.pt2").write_bytes(b"")
    spec = DeploySpec(source="net.pt2", package=str(tmp_path), options={"path": "/etc"})
    assert resolve_source(spec)[1]["path"] == str((tmp_path / "net.pt2").resolve())


def test_values_that_are_not_finite_or_too_many_dimensions_are_400_before_anything_is_stored(tmp_path):
    async def test(world: World) -> None:
        deep = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1] * 1000, "data": [1.0]}]}
        r = await world.call("invoker", "POST", "/v2/models/a/infer", deep)
        assert r.status_code == 400 and "1000 dimensions" in r.json()["error"], r.text
        for timeout in ("NaN", "Infinity", "-1"):
            raw = json.dumps(INFER)[:-1] + f', "parameters": {{"timeout": {timeout}}}}}'
            r = await world.call("invoker", "POST", "/v2/models/a/infer", headers={}, content=raw.encode())
            assert r.status_code == 400 and "parameter 'timeout'" in r.json()["error"], (timeout, r.text)
        for quota in ('{"rate_per_s": Infinity}', '{"rate_per_s": NaN}', '{"max_bytes": 99999999999999999999}'):
            r = await world.call("admin", "PUT", "/admin/tenants/acme", content=quota.encode())
            assert r.status_code == 400, (quota, r.text)
        assert world.guard.quota("acme").rate_per_s is None and world.service.registry.quotas() == []
        for keepalive in ("Infinity", "NaN", "1e12"):
            raw = f'{{"source": "{world.model_file}:M", "name": "k", "keepalive_hot_s": {keepalive}}}'
            r = await world.call("admin", "POST", "/admin/models", content=raw.encode())
            assert r.status_code == 400 and "keepalive_hot_s" in r.json()["error"], (keepalive, r.text)

    with_world(tmp_path, test)


def test_text_that_is_not_utf8_is_400_at_the_edge_for_an_embedding_model(tmp_path):
    async def test(world: World) -> None:
        for worker in world.service.backend.workers():
            worker.described = {
                "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
                "outputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
                "max_batch_size": 8,
                "task": "embeddings",
            }
        r = await world.deploy("deployer", {"source": f"{world.model_file}:M", "name": "e"})
        assert json.loads(r.text.splitlines()[-1])["stage"] == "done", r.text
        header = json.dumps(
            {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 15}}]}
        ).encode()
        body = header + (3).to_bytes(4, "little") + b"abc" + (4).to_bytes(4, "little") + b"\xff\xfe\x00a"
        headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
        batches = sum(len(w.batches) for w in world.service.backend.workers())
        r = await world.call("invoker", "POST", "/v2/models/e/infer", headers=headers, content=body)
        assert r.status_code == 400 and "element 1 is not UTF-8" in r.json()["error"], r.text  # the 2nd text
        assert sum(len(w.batches) for w in world.service.backend.workers()) == batches
        assert world.service.info("acme+e").failed == 0

    with_world(tmp_path, test)


def test_the_client_packs_a_class_files_folder_and_refuses_a_crowded_one(tmp_path, monkeypatch):
    monkeypatch.setattr(packaging, "MAX_PACKAGE_FILES", 8)
    folder = tmp_path / "model"
    (folder / "__pycache__").mkdir(parents=True)
    (folder / ".git").mkdir()
    (folder / "helpers").mkdir()
    for name in ("model.py", "weights.safetensors", "helpers/util.py", ".git/config", "__pycache__/model.pyc"):
        (folder / name).write_bytes(b"")
    package = pack(f"{folder}/model.py:M")
    assert package is not None and package.source == "model.py:M"
    with tarfile.open(package.file) as tar:
        assert sorted(tar.getnames()) == ["helpers", "helpers/util.py", "model.py", "weights.safetensors"]
    package.remove()
    assert pack("os:getcwd") is None and pack(f"{tmp_path}/absent.py:M") is None
    crowded = tmp_path / "home"
    crowded.mkdir()
    (crowded / "model.py").write_bytes(b"")
    for i in range(packaging.MAX_PACKAGE_FILES):
        (crowded / f"f{i}").write_bytes(b"")
    with pytest.raises(InvalidInput, match="a folder of their own"):
        pack(f"{crowded}/model.py:M", into=tmp_path)
    assert not list(tmp_path.glob("ember-package-*"))  # the half-made package is gone
