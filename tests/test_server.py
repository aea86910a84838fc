"""
nanochat/server.py as a client meets it on a small server (context 128, one slot and one waiting request):
capacity and input errors through the official openai client and raw HTTP.
"""

import httpx
import openai
import pytest

from conftest import chat_server

SEQUENCE_LEN = 128
MODEL_ID = "nanochat-sft-d2"
USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def small_url(tiny_chat_base_dir):
    """A server that holds 2 requests at once: 1 slot and 1 waiting."""
    with chat_server(max_batch_size=1, max_queue=1) as (_, url, _):
        yield url


def test_more_choices_than_the_server_can_ever_hold_is_a_400_naming_n_not_a_429(small_url):
    # a 429 tells the client to retry, and the openai client does, but no retry can ever succeed
    client = openai.OpenAI(base_url=small_url + "/v1", api_key="x", max_retries=2)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=2, n=3)
    assert info.value.body["param"] == "n"
    assert "--max-batch-size" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL_ID, prompt="Hi", max_tokens=2, n=3)
    assert info.value.body["param"] == "n"
    # as many choices as it holds are served
    reply = client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=2, n=2)
    assert [choice.index for choice in reply.choices] == [0, 1]


def test_a_text_part_without_text_names_the_missing_field(small_url):
    for part in ({"type": "text"}, {"type": "text", "text": None}):
        body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}, part]}]}
        response = httpx.post(small_url + "/v1/chat/completions", json=body)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == "messages[0].content[1].text"
        assert "messages[0].content[1].text" in error["message"] and "only text parts" not in error["message"]


def test_a_prompt_longer_than_the_context_says_so_in_good_grammar(small_url):
    response = httpx.post(small_url + "/v1/completions", json={"prompt": [5] * 200, "max_tokens": 2})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert "the prompt takes 200 tokens" in response.json()["error"]["message"]
    body = {"messages": [{"role": "user", "content": "word " * 200}], "max_tokens": 2}
    response = httpx.post(small_url + "/v1/chat/completions", json=body)
    assert response.status_code == 400 and "the messages take" in response.json()["error"]["message"]
