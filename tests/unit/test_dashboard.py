"""The dashboard's script, run in Node against stub ``fetch``/``prompt``/timers: how often it asks for a key.

No browser is needed; the stubs answer as the server does (401 without the right key). The test is
skipped where ``node`` is not installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from ember.gateway.app import _DASHBOARD

NODE = shutil.which("node")

HARNESS = r"""
const vm = require('vm');
const [code, answers] = JSON.parse(require('fs').readFileSync(0, 'utf8'));
process.on('unhandledRejection', () => {});  // counted below as what the page shows, not as a crash
let prompts = 0, timers = [], fetched = 0;
const elements = {};
const element = id => (elements[id] ||= {textContent: '', replaceChildren() {}, appendChild() {}});
const store = {};
const context = {
  document: {getElementById: element, createElement: () => element('new-' + Math.random())},
  localStorage: {getItem: k => (k in store ? store[k] : null), setItem: (k, v) => { store[k] = String(v); }},
  prompt: () => answers[Math.min(prompts++, answers.length - 1)],
  setInterval: f => { timers.push(f); return timers.length; },
  clearInterval: () => { timers = []; },
  fetch: async (path, options) => {
    fetched++;
    const ok = options.headers.Authorization === 'Bearer good-key';
    const body = !ok ? {error: 'this request needs an API key'}
      : path === '/admin/models' ? [] : {models: 0, workers: {ready: 2, size: 2}};
    return {status: ok ? 200 : 401, json: async () => body};
  },
};
vm.createContext(context);
vm.runInContext(code, context);
const settle = () => new Promise(resolve => setTimeout(resolve, 0));
(async () => {
  await settle();
  for (let tick = 0; tick < 5; tick++) {  // five refresh intervals, run at once rather than waited for
    for (const f of [...timers]) f();
    await settle();
  }
  console.log(JSON.stringify({prompts, fetched, timers: timers.length, status: element('status').textContent}));
})();
"""


def _run(answers: list[str | None]) -> dict[str, object]:
    assert NODE is not None
    script = re.search(r"<script>(.*)</script>", _DASHBOARD, re.S)
    assert script is not None
    done = subprocess.run(
        [NODE, "-e", HARNESS], input=json.dumps([script.group(1), answers]), capture_output=True, text=True, check=True
    )
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.skipif(NODE is None, reason="needs node to run the dashboard's script")
def test_a_cancelled_key_prompt_is_not_asked_again() -> None:
    result = _run([None])
    assert result["prompts"] == 1
    assert result["timers"] == 0  # it stopped polling
    assert "reload the page" in str(result["status"])


@pytest.mark.skipif(NODE is None, reason="needs node to run the dashboard's script")
def test_a_key_entered_once_serves_both_calls_and_every_refresh() -> None:
    result = _run(["good-key"])
    assert result["prompts"] == 1
    assert result["status"] == "0 models, 2/2 workers ready"
    assert result["timers"] == 1


@pytest.mark.skipif(NODE is None, reason="needs node to run the dashboard's script")
def test_a_wrong_key_asks_again_until_cancelled() -> None:
    result = _run(["wrong", None])
    assert result["prompts"] == 2 and result["timers"] == 0
