"""Chat templates, rendered as transformers renders them (its `generation` tag and globals) in a budgeted
sandbox (edgevlm/sandbox.py): templates come with bundles, untrusted."""

from __future__ import annotations

import functools
import json
from datetime import datetime

import jinja2
import jinja2.ext

from .deadline import Expired, deadline
from .errors import TemplateError
from .limits import DEFAULT, Limits
from .sandbox import Forbidden, Sandbox, budgeted_range, caps, install_filters, lipsum


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    if isinstance(indent, int) and indent > 64 or isinstance(indent, str) and len(indent) > 64:
        raise Forbidden("tojson indent over 64")
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


class _Generation(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}` (it marks assistant text for training masks): the
    body renders as it is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Dict:
    """transformers' `dict` global: builds plain dicts (`dict(a=1)`, `dict.fromkeys(...)`), never the type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def environment() -> jinja2.Environment:
    """The sandbox chat templates render in, with what transformers' chat templates may use: the `generation`
    tag, loop controls (`break`, `continue`), `raise_exception`, `strftime_now`, `namespace`, `dict` and
    `tojson` with its ensure_ascii / indent / separators / sort_keys options."""
    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
    install_filters(env)
    env.filters["tojson"] = _tojson
    env.globals["lipsum"] = lipsum
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = _Dict()
    return env


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = environment()
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TemplateError(f"chat template does not parse: {e}") from None
    except (RecursionError, MemoryError, SyntaxError, ValueError, OverflowError) as e:  # e.g. 1000 nested "("
        raise TemplateError(f"chat template cannot be compiled: {type(e).__name__}: {e}") from None


def render(source: str, messages: list[dict], add_generation_prompt: bool = True, limits: Limits = DEFAULT,
           **variables) -> str:
    """Render a chat template over plain-data messages ({"role", "content"}) the way HF processors do, within
    limits' template budget: time (template_seconds), output and value sizes, range() items."""
    template = _compile(source)
    token = caps.set(limits)
    try:
        with deadline(limits.template_seconds):
            parts, size = [], 0
            for part in template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                          tools=None, documents=None, range=budgeted_range(), **variables):
                size += len(part)
                if size > limits.template_output:
                    raise TemplateError(f"chat template output exceeds {limits.template_output} characters")
                parts.append(part)
        return "".join(parts)
    except Expired:
        raise TemplateError(f"chat template ran over its {limits.template_seconds} s budget") from None
    except Forbidden as e:
        raise TemplateError(f"chat template tried an operation the sandbox forbids: {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise TemplateError(f"chat template failed: {e}") from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, RecursionError, OverflowError,
            ZeroDivisionError, ArithmeticError, LookupError, UnicodeError, MemoryError) as e:
        raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
    finally:
        caps.reset(token)
