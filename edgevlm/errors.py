"""Typed errors: every failure a user can cause ends in one of these, with a message that says what to do."""


class EdgeVLMError(Exception):
    """Base class of every error edgevlm raises on purpose."""


class BundleError(EdgeVLMError):
    """The bundle directory or its manifest is malformed, incomplete or unsupported."""


class IntegrityError(BundleError):
    """A bundle file's sha256 does not match the manifest (tampered or torn file)."""


class ImageError(EdgeVLMError):
    """The image cannot be opened, is of a format we do not accept, or is too large."""


class VideoError(ImageError):
    """The video cannot be read (no decoder for it, a damaged file), has too many frames or pixels, or its frames
    are not images."""


class ContextOverflowError(EdgeVLMError):
    """The prompt (plus what must be generated) does not fit the model's context."""


class TemplateError(EdgeVLMError):
    """The chat template failed to render or tried something the sandbox forbids."""


class BackendError(EdgeVLMError):
    """An inference backend could not load or run a graph."""


class ExportError(EdgeVLMError):
    """A checkpoint could not be exported (unsupported family, failed parity, ...)."""


class DependencyError(EdgeVLMError):
    """An optional part of edgevlm is used without the extra that installs it (e.g. `pip install 'edgevlm[quant]'`)."""


class ArgumentError(EdgeVLMError, ValueError):
    """A generation or API argument is out of range (e.g. top_p = 0)."""
