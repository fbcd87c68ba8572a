"""The README's client snippets, run as written against a real server with the real clients."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
from harness import Server

ROOT = Path(__file__).resolve().parents[2]


def _block(marker: str) -> str:
    readme = (ROOT / "README.md").read_text()
    return next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if marker in b)


def test_the_tritonclient_snippet_works_and_leaves_its_headers_reusable(server: Server, linear: str) -> None:
    block = _block("tritonclient")
    block = block.replace("os.path.expanduser('~/.ember/admin.key')", repr(str(server.home / "admin.key")))
    block = block.replace('"localhost:8000"', f'"127.0.0.1:{server.port}"')
    names: dict[str, Any] = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(block, "README.md", "exec"), names)
    assert printed.getvalue().startswith("[[")
    triton, client, auth = names["triton"], names["client"], names["auth"]
    # tritonclient writes Inference-Header-Content-Length into the headers it is given: the README's
    # dict must come out as it went in, or the next request (here JSON both ways) would carry it.
    assert set(auth) == {"Authorization"}
    x = triton.InferInput("x", [1, 16], "FP32")
    x.set_data_from_numpy(np.ones((1, 16), np.float32), binary_data=False)
    wanted = triton.InferRequestedOutput("y", binary_data=False)
    answer = client.infer("linear", [x], outputs=[wanted], headers=dict(auth))
    assert answer.as_numpy("y").shape == (1, 16)
    client.close()


def test_the_openai_chat_snippet_streams_an_answer(server: Server, smollm2: str) -> None:
    block = _block("openai.OpenAI")
    block = block.replace('os.path.expanduser("~/.ember/admin.key")', repr(str(server.home / "admin.key")))
    block = block.replace("http://localhost:8000/v1", f"{server.url}/v1")
    assert 'model="smollm2"' in block and server.url in block
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(block, "README.md", "exec"), {})
    assert "paris" in printed.getvalue().lower()
