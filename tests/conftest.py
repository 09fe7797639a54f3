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

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """The project's shared/ folder (../shared beside the checkout, or RLKERN_SHARED)."""
    path = pathlib.Path(os.environ.get("RLKERN_SHARED", ROOT.parent / "shared"))
    if not path.exists():
        pytest.skip(f"shared data folder not found at {path}")
    return path


@pytest.fixture
def torch_one_thread():
    """Single-process loops over tiny networks: extra torch threads only contend."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
