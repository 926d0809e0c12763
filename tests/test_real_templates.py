"""Chat templates as transformers renders them: every template of the published checkpoints in tests/data/real/
(processor and tokenizer templates) and the jinja features transformers gives templates, rendered by edgevlm's
sandbox and by transformers' own renderer, must agree text for text (or both refuse)."""

from __future__ import annotations

import json

import pytest

from edgevlm.errors import TemplateError
from edgevlm.template import render
from real_checkpoints import REAL

IMAGE_TEXT = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}
CONVERSATIONS = {  # typed items (processor templates) and plain strings (text templates)
    "image": [IMAGE_TEXT],
    "text first": [{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image"}]}],
    "system + image": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, IMAGE_TEXT],
    "multi-turn": [IMAGE_TEXT, {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
                   {"role": "user", "content": [{"type": "text", "text": "Which colour?"}]}],
    "strings": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nWhat is it?"},
                {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Sure?"}],
}
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def published_templates() -> dict[str, str]:
    """folder/file -> template, for every template file and every tokenizer_config.json template."""
    found = {}
    for folder in sorted(p for p in REAL.iterdir() if p.is_dir()):
        for f in sorted(folder.iterdir()):
            if f.name.endswith(".jinja"):
                found[f"{folder.name}/{f.name}"] = f.read_text(encoding="utf-8")
            elif f.name.startswith("chat_template") and f.name.endswith(".json"):
                found[f"{folder.name}/{f.name}"] = json.loads(f.read_text(encoding="utf-8"))["chat_template"]
            elif f.name == "tokenizer_config.json":
                t = json.loads(f.read_text(encoding="utf-8")).get("chat_template")
                if isinstance(t, list):  # named templates
                    t = {x["name"]: x["template"] for x in t}.get("default")
                if t:
                    found[f"{folder.name}/{f.name}"] = t
    return found


TEMPLATES = published_templates()


def _transformers(template, messages, add_generation_prompt, **kw):
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                        add_generation_prompt=add_generation_prompt, **SPECIAL, **kw)
    return rendered[0]


def _both(template, messages, add_generation_prompt=True, **kw):
    """(ours, transformers') rendering; an exception on either side as its type name."""
    try:
        ours = render(template, messages, add_generation_prompt=add_generation_prompt, **SPECIAL, **kw)
    except TemplateError:
        ours = "refused"
    try:
        theirs = _transformers(template, messages, add_generation_prompt, **kw)
    except Exception:  # noqa: BLE001 - any failure of transformers' renderer: the template refuses this input
        theirs = "refused"
    return ours, theirs


def test_every_published_template_is_found():
    # the templates of the issue: llava-hf's with {% generation %}, the OneVision processor's, SmolVLM's, Granite's
    assert len(TEMPLATES) >= 15, sorted(TEMPLATES)
    assert sum("{% generation %}" in t for t in TEMPLATES.values()) >= 3
    for name in ("llava-1.5-7b-hf/chat_template.json", "llava-onevision-qwen2-0.5b-ov-hf/chat_template.json",
                 "smolvlm-256m-instruct/chat_template.json", "granite-docling-258m/chat_template.jinja",
                 "fastvlm-0.5b-apple/tokenizer_config.json"):
        assert name in TEMPLATES, name


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_published_template_renders_as_transformers_renders_it(name):
    rendered = 0
    for conv, messages in CONVERSATIONS.items():
        for gen in (True, False):
            ours, theirs = _both(TEMPLATES[name], messages, gen)
            assert ours == theirs, (name, conv, gen)
            rendered += ours != "refused"
    print(f"{name}: {rendered} of {2 * len(CONVERSATIONS)} renderings identical to transformers', the rest refused "
          "by both")
    assert rendered >= 2  # every template renders its own kind of conversation


FEATURES = {
    "generation tag": "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
                      "{% endgeneration %}{% else %}{{ m.content }}{% endif %}|{% endfor %}",
    "loop controls": "{% for m in messages %}{% if loop.index == 2 %}{% continue %}{% endif %}"
                     "{% if loop.index > 3 %}{% break %}{% endif %}{{ m.role }};{% endfor %}",
    "tojson options": "{{ messages | tojson(indent=2, sort_keys=True) }}{{ {'é': [1, 2]} | tojson }}"
                      "{{ {'a': 1} | tojson(separators=(',', ':'), ensure_ascii=True) }}",
    "namespace": "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}",
    "dict": "{{ dict(a=1, b=2) | tojson }}{{ dict.fromkeys(['x', 'y']) | tojson }}",
    "strftime_now": "{{ strftime_now('%Y') }}",
    "raise_exception": "{% if messages | length > 1 %}{{ raise_exception('one message only') }}{% endif %}ok",
    "whitespace control": "{%- for m in messages -%}\n  {{- m.role }}\n{% endfor -%}",
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_transformers_template_features(feature):
    messages = CONVERSATIONS["strings"]
    ours, theirs = _both(FEATURES[feature], messages)
    print(f"{feature}: {ours!r}")
    assert ours == theirs
    if feature == "raise_exception":
        assert ours == "refused" and _both(FEATURES[feature], messages[:1]) == ("ok", "ok")
    else:
        assert ours != "refused"


@pytest.mark.parametrize("source", [
    "{% generation %}{{ ''.__class__.__mro__ }}{% endgeneration %}",
    "{% generation %}{{ messages.append(1) }}{% endgeneration %}",
    "{{ dict.__class__ }}",
    "{{ (dict.fromkeys)['__globals__'] }}",
])
def test_the_new_features_stay_inside_the_sandbox(source):
    with pytest.raises(TemplateError):
        render(source, CONVERSATIONS["strings"])
