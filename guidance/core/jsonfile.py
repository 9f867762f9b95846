"""Reading JSON files with errors that name the file and the problem."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, TypeVar

__all__ = ["read_json", "read_json_as"]

T = TypeVar("T")


def read_json(path: str | Path, *, what: str, error: type[Exception] = ValueError) -> Any:
    """The parsed content of a JSON file; ``error`` ("<what> file not found: ..." or
    "... is not valid JSON: ...") when it is missing or malformed."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{what} file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{what} file {path} is not valid JSON: {exc}") from None


def read_json_as(path: str | Path, parse: Callable[[Any], T], *, what: str, error: type[Exception]) -> T:
    """``parse`` of a JSON file's content (a schema validator raising ``error``); every
    error names the file."""
    content = read_json(path, what=what, error=error)
    try:
        return parse(content)
    except error as exc:
        raise error(f"{path}: {exc}") from None
