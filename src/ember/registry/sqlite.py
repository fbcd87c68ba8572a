"""The registry in SQLite: deployments survive a restart of ``ember serve``.

A deployment is written in two steps. ``begin`` records it as *importing*; ``finish`` marks it
*ready* once its weights are in the store. A crash between the two leaves an *importing* row,
which ``recover`` removes at the next start, so no half-deployed model is ever served.
Versions count up per name and are never reused, even after ``remove``.

Each deployed version's measured batch and load times (``measurements``, the latency model's
JSON) are kept beside it, so predictions survive a restart; they go with the deployment.

The same database holds API keys (their hashes, never the keys), tenants' quotas and metered usage
(``ember.metering``: per model, tenant and minute, added to at each flush). Its schema version is
SQLite's ``user_version``; opening an older home adds what it lacks, so homes made before keys or
usage existed keep working.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.auth.keys import KeyRecord, Role
from ember.auth.quota import TenantQuota
from ember.errors import InvalidInput, ModelExists, ModelNotFound
from ember.metering import Usage

__all__ = ["DeploymentRecord", "Registry"]

SCHEMA_VERSION = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deployments (
    name TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('importing', 'ready')),
    spec TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    name TEXT PRIMARY KEY,
    last INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS measurements (
    key TEXT PRIMARY KEY,
    latency TEXT NOT NULL,
    updated_at REAL NOT NULL
);
"""

#: Version 2: API keys and tenants.
_KEYS_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL CHECK (role IN ('admin', 'deployer', 'invoker')),
    tenant TEXT,
    label TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY,
    rate_per_s REAL,
    burst INTEGER,
    max_models INTEGER,
    max_bytes INTEGER,
    max_instances INTEGER
);
"""

#: Version 4: metered usage, one row per model, tenant and wall-clock bucket (``ember.metering``).
_USAGE_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    model TEXT NOT NULL,
    tenant TEXT NOT NULL,
    bucket REAL NOT NULL,
    device_seconds REAL NOT NULL,
    device_gb_seconds REAL NOT NULL,
    host_gb_seconds REAL NOT NULL,
    requests INTEGER NOT NULL,
    PRIMARY KEY (model, tenant, bucket)
);
"""


@dataclass(frozen=True)
class DeploymentRecord:
    name: str
    version: int
    state: str
    spec: dict[str, Any]
    metadata: dict[str, Any]
    created_at: float

    @property
    def key(self) -> str:
        """The store's key for this version's weights."""
        return f"{self.name}@{self.version}"


class Registry:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise InvalidInput(
                f"the registry's schema is version {version}, newer than this Ember ({SCHEMA_VERSION}); upgrade Ember"
            )
        if version < 2:
            self._db.executescript(_KEYS_SCHEMA)
        elif version < 3:
            self._db.execute("ALTER TABLE tenants ADD COLUMN max_instances INTEGER")
        if version < 4:
            self._db.executescript(_USAGE_SCHEMA)
        if version < SCHEMA_VERSION:
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def begin(self, name: str, spec: dict[str, Any], created_at: float) -> DeploymentRecord:
        with self._lock, self._transaction():
            row = self._db.execute("SELECT state FROM deployments WHERE name = ?", (name,)).fetchone()
            if row is not None:
                what = "being deployed" if row[0] == "importing" else "deployed"
                raise ModelExists(f"model '{name}' is already {what}; `ember rm {name}` first, or pick another --name")
            last = self._db.execute("SELECT last FROM versions WHERE name = ?", (name,)).fetchone()
            version = 1 if last is None else int(last[0]) + 1
            self._db.execute("INSERT OR REPLACE INTO versions (name, last) VALUES (?, ?)", (name, version))
            self._db.execute(
                "INSERT INTO deployments VALUES (?, ?, 'importing', ?, '{}', ?)",
                (name, version, json.dumps(spec), created_at),
            )
        return DeploymentRecord(name, version, "importing", dict(spec), {}, created_at)

    def finish(self, name: str, metadata: dict[str, Any]) -> DeploymentRecord:
        with self._lock, self._transaction():
            cur = self._db.execute(
                "UPDATE deployments SET state = 'ready', metadata = ? WHERE name = ? AND state = 'importing'",
                (json.dumps(metadata), name),
            )
            if cur.rowcount != 1:
                raise ModelNotFound(name)
        return self.get(name)

    def abort(self, name: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM deployments WHERE name = ? AND state = 'importing'", (name,))

    def get(self, name: str) -> DeploymentRecord:
        with self._lock:
            row = self._db.execute(
                "SELECT name, version, state, spec, metadata, created_at FROM deployments "
                "WHERE name = ? AND state = 'ready'",
                (name,),
            ).fetchone()
        if row is None:
            raise ModelNotFound(name)
        return _record(row)

    def all(self) -> list[DeploymentRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, version, state, spec, metadata, created_at FROM deployments "
                "WHERE state = 'ready' ORDER BY name"
            ).fetchall()
        return [_record(row) for row in rows]

    def remove(self, name: str) -> DeploymentRecord:
        record = self.get(name)
        with self._lock, self._transaction():
            self._db.execute("DELETE FROM deployments WHERE name = ?", (name,))
            self._db.execute("DELETE FROM measurements WHERE key = ?", (record.key,))
        return record

    def remove_row(self, name: str) -> None:
        """Delete ``name``'s row whatever its state (for a row that cannot be served)."""
        with self._lock:
            self._db.execute("DELETE FROM deployments WHERE name = ?", (name,))

    def update_spec(self, name: str, changes: dict[str, Any]) -> DeploymentRecord:
        """Change fields of the deployed ``name``'s spec in place (its version stays)."""
        with self._lock, self._transaction():
            row = self._db.execute(
                "SELECT spec FROM deployments WHERE name = ? AND state = 'ready'", (name,)
            ).fetchone()
            if row is None:
                raise ModelNotFound(name)
            spec = {**json.loads(row[0]), **changes}
            self._db.execute("UPDATE deployments SET spec = ? WHERE name = ?", (json.dumps(spec), name))
        return self.get(name)

    def save_latency(self, key: str, latency: dict[str, Any], updated_at: float) -> None:
        """Keep the measured times of deployment ``key`` (``name@version``)."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO measurements (key, latency, updated_at) VALUES (?, ?, ?)",
                (key, json.dumps(latency), updated_at),
            )

    def latency(self, key: str) -> dict[str, Any]:
        """The measured times kept for ``key``; empty if none (or unreadable: they are only a hint)."""
        with self._lock:
            row = self._db.execute("SELECT latency FROM measurements WHERE key = ?", (key,)).fetchone()
        if row is None:
            return {}
        try:
            data = json.loads(row[0])
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def recover(self) -> list[DeploymentRecord]:
        """Drop deployments a crash left half-imported; returns them so their files can go too."""
        with self._lock, self._transaction():
            rows = self._db.execute(
                "SELECT name, version, state, spec, metadata, created_at FROM deployments WHERE state = 'importing'"
            ).fetchall()
            self._db.execute("DELETE FROM deployments WHERE state = 'importing'")
        return [_record(row) for row in rows]

    # -- keys and tenants --------------------------------------------------------------------------

    def add_key(self, record: KeyRecord) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, NULL)",
                (record.id, record.key_hash, record.role.value, record.tenant, record.label, record.created_at),
            )

    def api_keys(self, include_revoked: bool = False) -> list[KeyRecord]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        with self._lock:
            rows = self._db.execute(
                "SELECT id, key_hash, role, tenant, label, created_at, revoked_at FROM api_keys"
                + where
                + " ORDER BY created_at, id"
            ).fetchall()
        return [
            KeyRecord(str(i), str(h), Role(r), t, str(label), float(c), None if rv is None else float(rv))
            for i, h, r, t, label, c, rv in rows
        ]

    def revoke_key(self, key_id: str, revoked_at: float) -> bool:
        """Revoke the live key ``key_id``; False if there is none."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (revoked_at, key_id)
            )
        return cur.rowcount == 1

    def set_quota(self, quota: TenantQuota) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO tenants (name, rate_per_s, burst, max_models, max_bytes, max_instances) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (quota.tenant, quota.rate_per_s, quota.burst, quota.max_models, quota.max_bytes, quota.max_instances),
            )

    def quotas(self) -> list[TenantQuota]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, rate_per_s, burst, max_models, max_bytes, max_instances FROM tenants ORDER BY name"
            ).fetchall()
        return [TenantQuota(*row) for row in rows]

    # -- usage -------------------------------------------------------------------------------------

    def add_usage(self, charges: dict[tuple[str, str, float], Usage]) -> None:
        """Add ``charges`` (by model, tenant and bucket start) to what is recorded, in one transaction."""
        if not charges:
            return
        rows = [
            (m, t, b, u.device_seconds, u.device_gb_seconds, u.host_gb_seconds, u.requests)
            for (m, t, b), u in charges.items()
        ]
        with self._lock, self._transaction():
            self._db.executemany(
                "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (model, tenant, bucket) DO UPDATE SET "
                "device_seconds = device_seconds + excluded.device_seconds, "
                "device_gb_seconds = device_gb_seconds + excluded.device_gb_seconds, "
                "host_gb_seconds = host_gb_seconds + excluded.host_gb_seconds, "
                "requests = requests + excluded.requests",
                rows,
            )

    def usage(self, since: float | None = None, tenant: str | None = None) -> dict[tuple[str, str], Usage]:
        """Usage by (model, tenant), summed over the buckets that start at or after ``since``."""
        where: list[str] = ["1"]
        args: list[object] = []
        if since is not None:
            where.append("bucket >= ?")
            args.append(since)
        if tenant is not None:
            where.append("tenant = ?")
            args.append(tenant)
        with self._lock:
            rows = self._db.execute(
                "SELECT model, tenant, SUM(device_seconds), SUM(device_gb_seconds), SUM(host_gb_seconds), "
                f"SUM(requests) FROM usage WHERE {' AND '.join(where)} GROUP BY model, tenant ORDER BY model, tenant",
                args,
            ).fetchall()
        return {(str(m), str(t)): Usage(float(d), float(g), float(h), int(r)) for m, t, d, g, h, r in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, value: object, tb: object) -> None:
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")


def _record(row: tuple[Any, ...]) -> DeploymentRecord:
    name, version, state, spec, metadata, created_at = row
    return DeploymentRecord(
        str(name), int(version), str(state), json.loads(spec), json.loads(metadata), float(created_at)
    )
