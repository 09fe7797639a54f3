import os
import pathlib

# Triton kernels run on CPU tensors through the interpreter when no GPU is present.
# triton.jit reads this when a kernel is defined, so it is set before rlkern is imported.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

import pytest

try:
    from hypothesis import HealthCheck, settings

    # Property-based tests (tests/test_property_*.py) run a fixed budget in CI; choose a
    # larger one locally with `pytest --hypothesis-profile thorough`.
    _slow_ok = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                              suppress_health_check=_slow_ok, print_blob=True)
    settings.register_profile("thorough", max_examples=1000, deadline=None, suppress_health_check=_slow_ok,
                              print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:
    pass

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """tests/data: the test data that ships with the checkout (see tests/data/README.md)."""
    return ROOT / "tests" / "data"


@pytest.fixture
def torch_one_thread():
    """Single-process loops over tiny networks: extra torch threads only contend."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
