"""One root exception; each user-facing error also inherits the matching builtin.

Messages say what was seen, what was expected and how to fix it, on one line, so the
CLI can print them without a traceback.
"""

from __future__ import annotations


class ToxtestsError(Exception):
    """Root of every error toxtests raises on purpose (a user's mistake, not a bug)."""


class ConfigError(ToxtestsError, ValueError):
    """A thresholds file or an option has an unknown key or a wrong value."""


class PromptFileError(ToxtestsError, ValueError):
    """A prompt source cannot be read or holds no usable prompt."""


class ModelLoadError(ToxtestsError, OSError):
    """A base model or an adapter cannot be found or does not fit."""


class ScorerError(ToxtestsError, RuntimeError):
    """A scorer cannot load or returned something that is not a valid score."""


class UnsafeCheckpointError(ToxtestsError, PermissionError):
    """A pickle-based checkpoint was refused because its origin is not verified."""


class GenerationError(ToxtestsError, RuntimeError):
    """Generation cannot proceed safely (e.g. a prompt longer than the context)."""


class CacheCorruptionWarning(UserWarning):
    """A cache entry failed its checksum and was regenerated."""


class EngineUnavailableError(ToxtestsError, ImportError):
    """An engine's library is not installed (the message gives the install line)."""


class EndpointError(GenerationError):
    """An OpenAI-compatible server failed, timed out or answered something malformed."""
