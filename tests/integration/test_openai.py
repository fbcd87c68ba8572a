"""The OpenAI-compatible routes, spoken by the official ``openai`` client."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import openai
import pytest
import tritonclient.http as triton_http
from harness import Server, embed_binary

TEXTS = ["Ember keeps models warm.", "A cat sleeps on the sofa.", "Serverless inference scales to zero."]


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[openai.OpenAI]:
    # No retries: every answer the test sees is the server's first.
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0, timeout=120.0) as client:
        yield client


def test_embeddings_for_a_list_match_tritonclient(
    client: openai.OpenAI, triton: triton_http.InferenceServerClient, minilm: str
) -> None:
    # No encoding_format: the client asks for base64 and decodes it itself.
    answer = client.embeddings.create(model=minilm, input=TEXTS)
    assert answer.model == minilm
    assert [item.index for item in answer.data] == list(range(len(TEXTS)))
    got = np.array([item.embedding for item in answer.data], dtype=np.float32)
    np.testing.assert_allclose(got, embed_binary(triton, minilm, TEXTS), rtol=0, atol=1e-5)
    words = sum(len(t.split()) for t in TEXTS)
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == words


def test_embedding_of_a_single_string_matches_tritonclient(
    client: openai.OpenAI, triton: triton_http.InferenceServerClient, minilm: str
) -> None:
    answer = client.embeddings.create(model=minilm, input=TEXTS[1])
    (item,) = answer.data
    expected = embed_binary(triton, minilm, [TEXTS[1]])[0]
    np.testing.assert_allclose(np.array(item.embedding, dtype=np.float32), expected, rtol=0, atol=1e-5)


def test_float_and_base64_encodings_agree(client: openai.OpenAI, minilm: str) -> None:
    as_float = client.embeddings.create(model=minilm, input=TEXTS, encoding_format="float")
    as_base64 = client.embeddings.create(model=minilm, input=TEXTS)
    np.testing.assert_allclose(
        np.array([d.embedding for d in as_float.data]), np.array([d.embedding for d in as_base64.data]), atol=1e-6
    )


def test_dimensions_truncates_and_renormalises(client: openai.OpenAI, minilm: str) -> None:
    full = np.array(client.embeddings.create(model=minilm, input=TEXTS[0]).data[0].embedding)
    short = np.array(client.embeddings.create(model=minilm, input=TEXTS[0], dimensions=64).data[0].embedding)
    assert short.shape == (64,)
    np.testing.assert_allclose(short, full[:64] / np.linalg.norm(full[:64]), atol=1e-5)
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=minilm, input=TEXTS[0], dimensions=len(full) + 1)
    assert "dimensions" in str(caught.value.body)


def test_too_many_or_no_texts_are_bad_requests(client: openai.OpenAI, server: Server, minilm: str) -> None:
    most = int(server.get_json(f"/v2/models/{minilm}/config")["max_batch_size"])
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=minilm, input=["word"] * (most + 1))
    assert f"at most {most}" in str(caught.value.body)
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=minilm, input=[])
    assert "'input'" in str(caught.value.body)


def test_models_list_includes_deployed_models(client: openai.OpenAI, server: Server, minilm: str) -> None:
    listed = {model.id for model in client.models.list()}
    assert minilm in listed
    assert listed == {m["name"] for m in server.get_json("/admin/models")}
    assert client.models.retrieve(minilm).id == minilm


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model="no-such-model", input="hello")
    assert caught.value.status_code == 404
    assert "no-such-model" in str(caught.value.body)
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert "no-such-model" in str(caught.value.body)


def test_non_embedding_model_is_a_bad_request(client: openai.OpenAI, linear: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=linear, input="hello")
    assert caught.value.status_code == 400
    assert "not an embedding model" in str(caught.value.body)


def test_error_message_reaches_the_openai_client(client: openai.OpenAI, linear: str) -> None:
    with pytest.raises(openai.BadRequestError, match="not an embedding model"):
        client.embeddings.create(model=linear, input="hello")


def test_chat_completions_on_an_embedding_model_is_a_bad_request_naming_its_routes(
    client: openai.OpenAI, minilm: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=minilm, messages=[{"role": "user", "content": "hello"}])
    assert caught.value.status_code == 400
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "invalid_request_error" and body["param"] == "model"
    assert f"/v2/models/{minilm}/infer" in body["message"] and "/v1/embeddings" in body["message"]
    with pytest.raises(openai.BadRequestError, match="not a generative model"):
        client.completions.create(model=minilm, prompt="hello")
