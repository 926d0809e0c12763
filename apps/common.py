"""What the subcommands share: one-line errors, and loading a bundle with a note on stderr."""

from __future__ import annotations

import functools
import logging
import sys

from edgevlm.errors import EdgeVLMError


def one_line_errors(fn):
    """Run a command's main; an edgevlm error becomes one line on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(argv=None):
        logging.basicConfig(level=logging.WARNING, format="edgevlm: %(message)s")
        try:
            return fn(argv)
        except EdgeVLMError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130

    return wrapper
