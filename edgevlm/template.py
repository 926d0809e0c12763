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


MAX_OUTPUT = 1 << 20  # characters a template may produce (a prompt is far smaller; the context is the limit)
MAX_VALUE = 1 << 20  # length of a string or list a template may build with + or *
MAX_RANGE_ITEMS = 1 << 20  # range() items per render, all loops together


class _Sandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, stricter: touching an unsafe attribute is an error at once (not an empty
    undefined), and + / * / ** cannot build huge values."""

    intercepted_binops = frozenset({"+", "*", "**"})

    def unsafe_undefined(self, obj, attribute):
        raise jinja2.exceptions.SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is unsafe")

    def call_binop(self, context, operator, left, right):
        if operator == "**":
            if isinstance(right, (int, float)) and abs(right) > 64 and not (isinstance(left, (int, float)) and abs(left) <= 1):
                raise jinja2.exceptions.SecurityError("exponent too large")
            return left ** right
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * max(n, 0) > MAX_VALUE:
                raise jinja2.exceptions.SecurityError(f"value longer than {MAX_VALUE}")
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > 4096:
                raise jinja2.exceptions.SecurityError("integer too large")
            return left * right
        if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)) \
                and len(left) + len(right) > MAX_VALUE:
            raise jinja2.exceptions.SecurityError(f"value longer than {MAX_VALUE}")
        return left + right


def _budgeted_range():
    used = [0]

    def bounded_range(*args):
        r = range(*args)
        used[0] += len(r)
        if used[0] > MAX_RANGE_ITEMS:
            raise jinja2.exceptions.SecurityError(f"more than {MAX_RANGE_ITEMS} range() items in one render")
        return r

    return bounded_range


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
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
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


def render(source: str, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
    """Render a chat template over plain-data messages ({"role", "content"}) the way HF processors do."""
    template = _compile(source)
    try:
        parts, size = [], 0
        for part in template.generate(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                      documents=None, range=_budgeted_range(), **variables):
            size += len(part)
            if size > MAX_OUTPUT:
                raise TemplateError(f"chat template output exceeds {MAX_OUTPUT} characters")
            parts.append(part)
        return "".join(parts)
    except jinja2.exceptions.SecurityError as e:
        raise TemplateError(f"chat template tried an operation the sandbox forbids: {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise TemplateError(f"chat template failed: {e}") from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, RecursionError, OverflowError,
            ZeroDivisionError, ArithmeticError, LookupError, UnicodeError, MemoryError) as e:
        raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
