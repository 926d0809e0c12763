"""Chat templates, rendered in jinja2's immutable sandbox (templates come with bundles: untrusted)."""

from __future__ import annotations

import functools
import json
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import TemplateError


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Namespace(jinja2.utils.Namespace):
    # namespaces refuse underscore names: no route to interpreter internals
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TemplateError(f"chat template does not parse: {e}") from None


def render(source: str, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
    """Render a chat template over plain-data messages ({"role", "content"}) the way HF processors do."""
    template = _compile(source)
    try:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                               documents=None, **variables)
    except jinja2.exceptions.SecurityError as e:
        raise TemplateError(f"chat template tried an operation the sandbox forbids: {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise TemplateError(f"chat template failed: {e}") from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, RecursionError, OverflowError) as e:
        raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
