"""Loading the compiled core ``rlkern._C``."""

from __future__ import annotations

import importlib

_module = None
_error: BaseException | None = None


def load():
    global _module, _error
    if _module is None:
        try:
            _module = importlib.import_module("rlkern._C")
        except ImportError as e:  # a source checkout that was never built
            _error = e
            raise ImportError(
                "rlkern's compiled core (rlkern._C) is missing: install the package with "
                "`pip install .` (or run tools/dev_build.sh in a checkout)"
            ) from e
    return _module


def available() -> bool:
    try:
        load()
        return True
    except ImportError:
        return False
