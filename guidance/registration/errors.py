"""The registration layer's one error type."""

from guidance.core.errors import GuidanceError

__all__ = ["RegistrationError"]


class RegistrationError(GuidanceError):
    """Inputs or settings that cannot be registered (mismatched images and views, unknown
    level, optimizer or similarity name, bad masks)."""
