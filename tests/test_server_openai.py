"""The OpenAI surface of `edgevlm serve`, through the official `openai` client: structured output
(response_format json_schema / json_object, and the client's pydantic `parse`), logprobs, max_image_tokens, and
every chat-completions parameter either honoured or refused by name -- never dropped silently."""

from __future__ import annotations

import json
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

import edgevlm
from edgevlm.data import shapes
from test_server import ASSETS, STAR, ask, data_url

EXAMPLE = ASSETS / "examples" / "shapes-1.png"


class Obj(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: Literal[tuple(shapes.SIZES)]
    color: Literal[tuple(shapes.COLORS)]
    shape: Literal[tuple(shapes.SHAPES)]


class Scene(BaseModel):
    model_config = ConfigDict(extra="forbid")
    objects: list[Obj] = Field(max_length=3)


@pytest.fixture(scope="module")
def client(serve):
    return openai.OpenAI(base_url=serve() + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_json_schema_response_format(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "scene", "schema": shapes.scene_schema(), "strict": True}}
    for ex in shapes.examples(99, 8, split="eval"):
        r = client.chat.completions.create(model="demo", messages=ask("Describe the image.", data_url(ex.image)),
                                           response_format=fmt, max_tokens=120)
        Scene.model_validate_json(r.choices[0].message.content)
        assert r.choices[0].finish_reason == "stop"


def test_the_clients_pydantic_parse(client):
    """client.chat.completions.parse sends the model's JSON Schema (strict) and parses the reply into it."""
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    r = parse(model="demo", messages=ask("Describe the image.", data_url(EXAMPLE)), response_format=Scene, max_tokens=120)
    scene = r.choices[0].message.parsed
    print("parsed:", scene)
    assert isinstance(scene, Scene) and len(scene.objects) <= 3


def test_json_object_and_regex(client):
    r = client.chat.completions.create(model="demo", messages=ask(STAR, data_url(EXAMPLE)), max_tokens=60,
                                       response_format={"type": "json_object"})
    assert r.choices[0].message.content.startswith("{")
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "bogus": 1}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=ask(STAR), response_format=bad)
    assert e.value.body["param"] == "response_format"


def test_logprobs_in_openais_shape(client):
    r = client.chat.completions.create(model="demo", messages=ask(STAR, data_url(EXAMPLE)), logprobs=True,
                                       top_logprobs=2, max_tokens=8)
    content = r.choices[0].logprobs.content
    text = "".join(c.token for c in content)
    print("answer", repr(r.choices[0].message.content), "logprobs", [(c.token, round(c.logprob, 4)) for c in content])
    assert r.choices[0].message.content in text and all(c.logprob <= 0 for c in content)
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    assert content[0].top_logprobs[0].token == content[0].token  # greedy: the likeliest token was taken
    stream = client.chat.completions.create(model="demo", messages=ask(STAR, data_url(EXAMPLE)), logprobs=True,
                                            max_tokens=8, stream=True)
    streamed = [c.choices[0].logprobs.content[0].logprob for c in stream if c.choices and c.choices[0].logprobs]
    assert streamed == [c.logprob for c in content]  # the same figures, token by token


def test_max_image_tokens(client):
    full = client.chat.completions.create(model="demo", messages=ask(STAR, data_url(EXAMPLE)), max_tokens=2)
    cut = client.chat.completions.create(model="demo", messages=ask(STAR, data_url(EXAMPLE)), max_tokens=2,
                                         extra_body={"max_image_tokens": 4})
    assert cut.usage.prompt_tokens == full.usage.prompt_tokens - (edgevlm.load().manifest.image_tokens - 4)


# OpenAI's chat-completions request fields (2026), each with a value a client might send
OPENAI_FIELDS = {
    "audio": {"voice": "alloy", "format": "mp3"}, "frequency_penalty": 0.5, "function_call": "auto",
    "functions": [{"name": "f", "parameters": {}}], "logit_bias": {"1": 1}, "logprobs": True, "max_completion_tokens": 4,
    "max_tokens": 4, "metadata": {"k": "v"}, "modalities": ["text"], "n": 2, "parallel_tool_calls": True,
    "prediction": {"type": "content", "content": "x"}, "presence_penalty": 0.5, "prompt_cache_key": "k",
    "reasoning_effort": "low", "response_format": {"type": "json_object"}, "safety_identifier": "u",
    "seed": 1, "service_tier": "auto", "stop": ["x"], "store": False, "stream": False,
    "stream_options": {"include_usage": True}, "temperature": 0.5,
    "tool_choice": "auto", "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    "top_logprobs": 2, "top_p": 0.9, "user": "u", "verbosity": "low", "web_search_options": {},
}
HONOURED = {"logit_bias", "logprobs", "max_completion_tokens", "max_tokens", "response_format", "seed", "stop",
            "stream", "stream_options", "temperature", "top_logprobs", "top_p"}


@pytest.mark.parametrize("field", sorted(OPENAI_FIELDS))
def test_every_openai_parameter_is_honoured_or_refused(client, field):
    extra = {"logprobs": True} if field == "top_logprobs" else {}
    body = {field: OPENAI_FIELDS[field], **extra}
    try:
        r = client.chat.completions.create(model="demo", messages=ask(STAR), max_tokens=4, **{"extra_body": body})
    except openai.BadRequestError as e:
        print(field, "->", e.status_code, e.body)
        assert field not in HONOURED and e.body["param"] == field and e.body["code"] == "unsupported_parameter"
        return
    print(field, "-> honoured")
    assert field in HONOURED and r.choices[0].finish_reason in ("stop", "length")
    if field == "logprobs":
        assert r.choices[0].logprobs is not None
    if field == "response_format":
        assert r.choices[0].message.content.startswith("{")
