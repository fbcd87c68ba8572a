"""Fixtures of the integration tier: one shared ``ember serve`` (2 workers) and the models most tests use.

Tests that restart or kill a server start their own with :class:`harness.Server`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import tritonclient.http as triton_http
from harness import EXAMPLES, MAX_MODEL_LEN, BearerAuth, Server, served, smollm2_gguf


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The shared server; its teardown checks that SIGTERM stops it cleanly (exit 0, no worker left)."""
    with served(Server(tmp_path_factory.mktemp("shared") / "home", workers=2)) as running:
        yield running


@pytest.fixture(scope="session")
def triton(server: Server) -> Iterator[triton_http.InferenceServerClient]:
    client = triton_http.InferenceServerClient(f"127.0.0.1:{server.port}", network_timeout=120.0)
    client.register_plugin(BearerAuth(server.key))
    yield client
    client.close()


@pytest.fixture(scope="session")
def minilm(server: Server) -> str:
    """examples/minilm.py:MiniLM, deployed once through ``ember deploy`` (SLO 250 ms, not the default)."""
    done = server.deploy(EXAMPLES / "minilm.py:MiniLM", "--slo-ms", "250")
    assert re.search(r"ready in \d+ ms", done.stdout), done.stdout
    assert re.search(r"deployed minilm v\d+: hot", done.stdout), done.stdout
    return "minilm"


@pytest.fixture(scope="session")
def linear(server: Server) -> str:
    """examples/linear.py:Linear, deployed once through ``ember deploy``.

    Best effort: tests call it from the cool tier and expect the cold start to be served, whatever
    the load takes on a busy machine.
    """
    server.deploy(EXAMPLES / "linear.py:Linear", "--on-unmeetable", "best-effort")
    return "linear"


@pytest.fixture(scope="session")
def smollm2(server: Server) -> str:
    """SmolLM2 deployed once (the GGUF is converted at deploy, once), its length held to 512 tokens."""
    server.deploy(
        smollm2_gguf(), "--name", "smollm2", "--max-model-len", str(MAX_MODEL_LEN), "--on-unmeetable", "best-effort"
    )
    return "smollm2"
