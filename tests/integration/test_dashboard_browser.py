"""The dashboard in a real browser: Debian's Chromium, driven by Playwright, against a live ``ember serve``.

It signs in through the form, checks that the charts draw the traffic it sends, that an unload to
warm shows in the model's tier and timeline, that an admin key sees the workers and the end of their
logs, and that a tenant's key sees its tenant's models alone.
The screenshot is kept under the test's tmp path (``dashboard.png``). Skipped only where
``/usr/bin/chromium`` is absent (``.ci/run`` installs it).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from harness import EXAMPLES, Server, served

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WAIT_MS = 30_000

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")


@pytest.fixture
def own(tmp_path: Path) -> Iterator[Server]:
    with served(Server(tmp_path / "home", workers=2)) as running:
        yield running


def _traffic(server: Server, model: str, stop: threading.Event, key: str | None = None) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [1.0] * 16}]}
    while not stop.wait(0.05):
        server.http.post(f"{server.url}/v2/models/{model}/infer", json=body, headers=headers)


def test_the_dashboard_shows_live_models_tiers_and_tenants(own: Server, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    own.deploy(EXAMPLES / "linear.py:Linear", "--on-unmeetable", "best-effort")
    made = own.cli("keys", "create", "--role", "deployer", "--tenant", "acme")
    assert made.returncode == 0, made.stderr
    acme_key = made.stdout.strip()
    done = own.cli("deploy", str(EXAMPLES / "linear.py:Linear"), "--name", "lin2", key=acme_key)
    assert done.returncode == 0, done.stdout + done.stderr
    x = np.ones((1, 16), dtype=np.float32)
    for _ in range(5):
        assert own.infer_json("linear", {"x": x}).status_code == 200

    stop = threading.Event()
    sender = threading.Thread(target=_traffic, args=(own, "linear", stop), daemon=True)
    sender.start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(own.url + "/")
            page.fill("#key", own.key)
            page.click("#signin-form button[type=submit]")
            card = '.model[data-model="linear"]'
            page.wait_for_selector(card, timeout=WAIT_MS)
            assert page.locator(f"{card} .uplot canvas").count() >= 2  # both charts drew
            page.wait_for_function(
                f"Number(document.querySelector('{card} .traffic').dataset.points) > 0", timeout=WAIT_MS
            )
            assert page.locator(f"{card} .tier-badge").inner_text() == "hot"
            assert page.locator('#cost-models tr[data-model="linear"]').count() == 1
            assert page.locator("#cluster table").count() == 1  # admin keys see the workers
            assert page.locator("#cluster details").count() == 2  # and the end of each one's log

            # The traffic stops first: a request after the unload would load the model back to hot.
            stop.set()
            sender.join(timeout=30)
            answer = own.http.post(f"{own.url}/admin/models/linear/unload", params={"tier": "warm"})
            assert answer.status_code == 200, answer.text
            # A model this small reloads from cool in milliseconds, so the keep-alive may drop its warm
            # copy within seconds: the page (polling every 2 s) may next see it warm or already cool.
            page.wait_for_function(
                f"['warm', 'cool'].includes(document.querySelector('{card}').dataset.tier)"
                f" && document.querySelector('{card} .timeline [data-tier=warm]') !== null",
                timeout=WAIT_MS,
            )
            assert page.locator(f"{card} .timeline [data-tier=hot]").count() >= 1  # it was hot before
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)

            page.click("#signout")
            page.fill("#key", acme_key)
            page.click("#signin-form button[type=submit]")
            page.wait_for_selector('.model[data-model="acme+lin2"]', timeout=WAIT_MS)
            assert page.locator(".model").count() == 1
            assert page.locator('.model[data-model="linear"]').count() == 0
            assert "admin keys" in page.locator("#cluster").inner_text()
            assert "tenant acme" in page.locator("#who").inner_text()
            page.screenshot(path=str(tmp_path / "dashboard-acme.png"), full_page=True)
            browser.close()
    finally:
        stop.set()
        sender.join(timeout=10)
