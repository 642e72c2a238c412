"""Loading a native codec library through ctypes: the first of several candidate paths that binds."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TypeVar

log = logging.getLogger(__name__)

Bound = TypeVar("Bound")


def first_loadable(paths: Iterable[str], bind: Callable[[str], Bound], what: str) -> Bound | None:
    """`bind(path)` of the first candidate that loads and answers sanely (`bind` raises OSError or AttributeError
    for one that does not: missing file, missing symbol, wrong answers); None when none does."""
    for path in paths:
        try:
            return bind(path)
        except (OSError, AttributeError) as exc:
            log.debug("%s candidate %s unusable: %s", what, path, exc)
    return None
