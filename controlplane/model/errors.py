"""The model's errors: :class:`ModelError` (a ``ValueError`` with a one-line message) and
its subclasses :class:`InvalidLabel` and :class:`InvalidRecord`."""

from __future__ import annotations

__all__ = [
    "InvalidLabel",
    "InvalidRecord",
    "ModelError",
]


class ModelError(ValueError):
    """A value violates the model's rules. The message is always a single line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))


class InvalidLabel(ModelError):
    """A label or label set is malformed."""


class InvalidRecord(ModelError):
    """Stored (decoded) data does not describe a valid model object."""
