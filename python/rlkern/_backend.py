"""Which implementation runs an op: the compiled core, Triton, or the reference.

CPU tensors go to the C++ core, CUDA tensors to the CUDA/Triton kernels. The
environment variable ``RLKERN_BACKEND`` (or :func:`use_backend`) overrides this:

- ``reference``: the plain-PyTorch reference on every device (slow; the spec).
- ``cpu``: the C++ core (CPU tensors only).
- ``triton``: the Triton kernels, also on CPU tensors when ``TRITON_INTERPRET=1``
  (this is how the test suite runs Triton kernels on machines without a GPU).
- ``auto`` (default): by device.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")

_override: Optional[str] = None


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


_parsed_env = ("", "auto")  # (the last RLKERN_BACKEND value seen, its parsed backend)


def _env_reader():
    """A function returning RLKERN_BACKEND or None. ``os.environ.get`` of an unset variable
    raises and catches a KeyError inside (about a microsecond, on every eager call); the
    mapping's own store answers without that, and still sees changes made through
    ``os.environ``. Falls back to ``os.environ.get`` where that store is not there."""
    data, encode = getattr(os.environ, "_data", None), getattr(os.environ, "encodekey", None)
    if isinstance(data, dict) and callable(encode):
        key, decode = encode("RLKERN_BACKEND"), getattr(os.environ, "decodevalue", None)
        if callable(decode):
            def read() -> Optional[str]:
                raw = data.get(key)
                return None if raw is None else decode(raw)

            return read
    return lambda: os.environ.get("RLKERN_BACKEND")


_read_env = _env_reader()


def requested_backend() -> str:
    """The backend asked for by :func:`use_backend` or ``RLKERN_BACKEND``.

    Every eager call asks, so the variable's parsed value is kept until it changes."""
    global _parsed_env
    if _override is not None:
        return _override
    raw = _read_env()
    if raw is None:
        return "auto"
    if raw != _parsed_env[0]:
        _parsed_env = (raw, _check(raw.strip().lower() or "auto"))
    return _parsed_env[1]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block (tests and benchmarks use this)."""
    global _override
    previous, _override = _override, _check(name)
    try:
        yield
    finally:
        _override = previous


def select(device: torch.device, gpu: str = "triton") -> str:
    """Resolve the backend for tensors on ``device``.

    ``gpu`` names the kind of GPU kernel the op has ("triton" or "cuda"). Returns one of
    "reference", "cpu", "triton", "cuda".
    """
    want = requested_backend()
    if want == "reference":
        return "reference"
    if want == "auto":
        return "cpu" if device.type == "cpu" else (gpu if device.type == "cuda" else "reference")
    if want == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got tensors on {device}")
    if want == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1")
    if want == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors, got tensors on {device}")
    return want
