"""The server a user writes first for a chat model: ``transformers`` ``generate`` behind FastAPI.

One request at a time (a lock around ``generate``, which runs in a thread so the event loop keeps
accepting connections), streamed with ``TextIteratorStreamer`` as OpenAI's server-sent events, with
``stream_options.include_usage``. It is the baseline of ``benchmarks/generate.py``:

    python benchmarks/generate_baseline.py --model FOLDER --port 8001 [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer


def build_app(folder: str, device: str) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    lock = asyncio.Lock()
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        text = tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt").to(device)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        temperature = float(body.get("temperature", 1.0))
        settings: dict[str, Any] = {
            "max_new_tokens": int(body.get("max_tokens") or body.get("max_completion_tokens") or 16),
            "do_sample": temperature > 0,
            "pad_token_id": tokenizer.eos_token_id,
        }
        if temperature > 0:
            settings.update(temperature=temperature, top_p=float(body.get("top_p", 1.0)))
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        created = int(time.time())
        ident = f"chatcmpl-{uuid.uuid4().hex}"
        name = body.get("model", "model")
        count: list[int] = []

        def work() -> None:
            with torch.inference_mode():
                out = model.generate(**inputs, streamer=streamer, **settings)
            count.append(int(out.shape[1]) - prompt_tokens)

        async def events() -> AsyncIterator[bytes]:
            async with lock:  # one generation at a time
                thread = threading.Thread(target=work, daemon=True)
                thread.start()
                pieces = iter(streamer)
                while True:
                    piece = await asyncio.to_thread(next, pieces, None)
                    if piece is None:
                        break
                    if piece:
                        delta = {"content": piece}
                        yield _event(ident, created, name, [{"index": 0, "delta": delta, "finish_reason": None}])
                await asyncio.to_thread(thread.join)
            generated = count[0] if count else 0
            reason = "length" if generated >= settings["max_new_tokens"] else "stop"
            yield _event(ident, created, name, [{"index": 0, "delta": {}, "finish_reason": reason}])
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": generated}
            yield _event(ident, created, name, [], usage=usage)
            yield b"data: [DONE]\n\n"

        if body.get("stream"):
            return StreamingResponse(events(), media_type="text/event-stream")
        text_out = []
        async for raw in events():
            if raw.startswith(b"data: {"):
                for choice in json.loads(raw[6:])["choices"]:
                    text_out.append(choice["delta"].get("content", ""))
        return JSONResponse(
            {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text_out)}}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": count[0] if count else 0},
            }
        )

    return app


def _event(ident: str, created: int, name: str, choices: list[Any], usage: Any = None) -> bytes:
    chunk = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name, "choices": choices}
    if usage is not None:
        chunk["usage"] = usage
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="A Hugging Face causal-LM folder.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    uvicorn.run(build_app(args.model, args.device), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
