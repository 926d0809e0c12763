"""The jinja2 sandbox chat templates render in, with a budget for every way a template can make work.

jinja2's ImmutableSandboxedEnvironment stops a template from reaching Python's internals; it does not stop one
from building a gigabyte string or looping for an hour. Two kinds of guard close that:

- every operation that makes a value in one step -- `+ * ** %`, `str.format` and the string methods and
  filters that take a width or a count (center, ljust, zfill, replace, join, indent, wordwrap, truncate,
  batch, slice, tojson's indent), `range`, `lipsum` -- is checked against the size its result would have
  before it runs (a single C call cannot be interrupted);
- everything else, the loops a template writes, runs under a deadline (edgevlm.deadline), and the output is
  cut off at a length (edgevlm/template.py's render).

The numbers are edgevlm.Limits' template_* fields, read per render from a context variable.
"""

from __future__ import annotations

import contextvars
import re
import string

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .limits import DEFAULT, Limits

caps: contextvars.ContextVar[Limits] = contextvars.ContextVar("edgevlm_template_caps", default=DEFAULT)
Forbidden = jinja2.exceptions.SecurityError
_WIDTH = re.compile(r"%[-+ #0]*(\*|\d+)?(?:\.(\*|\d+))?")  # printf-style conversions: flags, width, precision
_SPEC_NUMBERS = re.compile(r"\d+")
MAX_WIDTH = 4096  # a field width or precision in a format: far above any prompt's, far below a blow-up
MAX_BITS = 1 << 16  # integers a template computes with


def _value_cap() -> int:
    return caps.get().template_value


def _check_len(n: int) -> None:
    if n > _value_cap():
        raise Forbidden(f"value longer than {_value_cap()}")


def _check_printf(fmt: str) -> None:
    for width, precision in _WIDTH.findall(fmt):
        for x in (width, precision):
            if x == "*" or (x and int(x) > MAX_WIDTH):
                raise Forbidden(f"a format width or precision over {MAX_WIDTH} (or '*')")


def _check_format(fmt: str) -> None:  # str.format's fields: no nested fields, no huge widths
    for _, _, spec, _ in string.Formatter().parse(fmt):
        if spec and ("{" in spec or any(int(x) > MAX_WIDTH for x in _SPEC_NUMBERS.findall(spec))):
            raise Forbidden(f"a format spec {spec[:20]!r} with a nested field or a width over {MAX_WIDTH}")


def _power(left, right):
    if isinstance(left, int) and isinstance(right, int) and not isinstance(left, bool) and right > 0 \
            and abs(left) > 1 and left.bit_length() * right > MAX_BITS:
        raise Forbidden("integer too large")
    return left ** right


def _times(left, right):
    seq, n = (left, right) if isinstance(right, int) else (right, left)
    if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
        _check_len(len(seq) * max(n, 0))
    if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_BITS:
        raise Forbidden("integer too large")
    return left * right


def _plus(left, right):
    if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
        _check_len(len(left) + len(right))
    return left + right


def _modulo(left, right):
    if isinstance(left, str):
        _check_printf(left)
        _check_len(len(left) + sum(len(str(a)) for a in (right if isinstance(right, tuple) else (right,))))
    return left % right


BINOPS = {"**": _power, "*": _times, "+": _plus, "%": _modulo}


def _widths(*xs) -> None:
    for x in xs:
        if isinstance(x, int) and x > _value_cap():
            raise Forbidden(f"a width or count over {_value_cap()}")


def _join_checked(sep: str, items) -> str:
    items = [str(x) for x in items]
    _check_len(sum(map(len, items)) + len(sep) * max(len(items) - 1, 0))
    return sep.join(items)


def _replace_checked(s: str, old: str, new: str, count: int = -1) -> str:
    hits = s.count(old) if old else len(s) + 1
    if count >= 0:
        hits = min(hits, count)
    _check_len(len(s) + hits * (len(new) - len(old)))
    return s.replace(old, new, count)


# str methods whose result size a width or count argument decides
_STR_METHODS = {"center", "ljust", "rjust", "zfill", "expandtabs", "join", "replace"}


class Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, stricter: an unsafe attribute is an error at once (not an empty undefined), and
    no single operation can build a value over the budget."""

    intercepted_binops = frozenset(BINOPS)

    def unsafe_undefined(self, obj, attribute):
        raise Forbidden(f"access to attribute {attribute!r} of a {type(obj).__name__} is unsafe")

    def call_binop(self, context, operator, left, right):
        return BINOPS[operator](left, right)

    def wrap_str_format(self, value):  # "...".format(...) and format_map: jinja2 wraps them where they are read
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt = value.__self__

        def checked(*args, **kwargs):
            _check_format(fmt)
            out = wrapped(*args, **kwargs)
            _check_len(len(out))
            return out

        return checked

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's own signature)
        owner = getattr(__obj, "__self__", None)
        name = getattr(__obj, "__name__", "")
        if isinstance(owner, str) and name in _STR_METHODS:
            if name == "join":
                return _join_checked(owner, *args)
            if name == "replace":
                return _replace_checked(owner, *args, **kwargs)
            if name in ("center", "ljust", "rjust", "zfill"):
                _widths(*args)
            if name == "expandtabs":
                _check_len(len(owner) * (args[0] if args and isinstance(args[0], int) else 8))
        return super().call(__context, __obj, *args, **kwargs)


def install_filters(env: jinja2.Environment) -> None:
    """Replace the built-in filters whose result size an argument decides with checked ones."""
    f = env.filters
    center, indent, wordwrap, truncate = f["center"], f["indent"], f["wordwrap"], f["truncate"]
    batch, slice_, fmt, replace = f["batch"], f["slice"], f["format"], f["replace"]

    def checked(fn, *positions):  # positions of the width arguments after the value
        shift = 1 if hasattr(fn, "jinja_pass_arg") else 0  # the environment or context jinja2 passes first

        def run(*args, **kwargs):
            _widths(*[a for i, a in enumerate(args[shift + 1:]) if i in positions], *kwargs.values())
            return fn(*args, **kwargs)

        if shift:
            run.jinja_pass_arg = fn.jinja_pass_arg
        return run

    f["center"], f["wordwrap"], f["truncate"] = checked(center, 0), checked(wordwrap, 0), checked(truncate, 0)
    f["batch"], f["slice"] = checked(batch, 0), checked(slice_, 0)

    def indent_checked(s, width=4, *args, **kwargs):
        _widths(width if isinstance(width, int) else len(str(width)))
        _check_len(len(str(s)) * (1 + (width if isinstance(width, int) else len(str(width)))))
        return indent(s, width, *args, **kwargs)

    def format_checked(value, *args, **kwargs):
        _check_printf(str(value))
        return fmt(value, *args, **kwargs)

    def replace_checked(eval_ctx, s, old, new, count=None):
        _replace_checked(str(s), str(old), str(new), -1 if count is None else count)  # (the size check only)
        return replace(eval_ctx, s, old, new, count)

    replace_checked.jinja_pass_arg = replace.jinja_pass_arg  # it takes the eval context, as the built-in does
    f["indent"], f["format"], f["replace"] = indent_checked, format_checked, replace_checked
    f["join"] = _join_filter(f["join"])


def _join_filter(join):
    def join_checked(eval_ctx, value, d="", attribute=None):
        items = list(value)
        _check_len(sum(len(str(x)) for x in items) + len(str(d)) * max(len(items) - 1, 0))
        return join(eval_ctx, items, d, attribute)

    join_checked.jinja_pass_arg = join.jinja_pass_arg
    return join_checked


def budgeted_range():
    """range() for one render, all its calls together bounded by Limits.template_loop_items."""
    used, cap = [0], caps.get().template_loop_items

    def bounded_range(*args):
        r = range(*args)
        used[0] += len(r)
        if used[0] > cap:
            raise Forbidden(f"more than {cap} range() items in one render")
        return r

    return bounded_range


def lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002 (jinja2's names)
    _widths(n * max)
    from jinja2.utils import generate_lorem_ipsum

    return generate_lorem_ipsum(n, html, min, max)
