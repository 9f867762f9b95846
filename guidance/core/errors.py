"""The one base class of every domain error in the project.

A ``GuidanceError`` is bad input or an impossible request, with a message that names
the problem; the CLI prints it without a traceback. Anything else is a bug. It is a
``ValueError`` so callers that catch bad values keep working.
"""

__all__ = ["GuidanceError"]


class GuidanceError(ValueError):
    """Bad input or an impossible request (file, geometry, message, option)."""
