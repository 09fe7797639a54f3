import json
import subprocess
import sys

import pytest
import torch

import rlkern


def test_info_reports_backends():
    report = rlkern.info()
    assert report["version"] == rlkern.__version__
    assert "cpu" in report["compiled"] and "cpu" in report["runnable"]
    assert set(report["runnable"]) <= set(report["compiled"])
    if not torch.cuda.is_available():
        assert "cuda" not in report["runnable"] and "triton" not in report["runnable"]


def test_thread_count_round_trip():
    before = rlkern.get_num_threads()
    try:
        rlkern.set_num_threads(3)
        assert rlkern.get_num_threads() == 3
        rlkern.set_num_threads(0)
        assert rlkern.get_num_threads() >= 1
    finally:
        rlkern.set_num_threads(before)
    with pytest.raises(TypeError, match="n must be an int"):
        rlkern.set_num_threads(2.5)


def test_backend_override_validates_names():
    with pytest.raises(ValueError, match="backend must be one of"):
        with rlkern.use_backend("fortran"):
            pass
    from rlkern import _backend

    with rlkern.use_backend("reference"):
        assert _backend.select(torch.device("cpu")) == "reference"
    assert _backend.select(torch.device("cpu")) in ("cpu", "reference", "triton")


def test_cli_info_prints_json():
    out = subprocess.run([sys.executable, "-m", "rlkern.cli", "info"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["version"] == rlkern.__version__


def test_rss_sampler_sees_a_large_allocation():
    from rlkern import _ext

    core = _ext.load()
    sampler = core.bench.RssSampler()
    base = core.bench.current_rss()
    sampler.start(100.0)
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    peak = sampler.stop()
    del x
    assert peak - base >= 48 * 2**20


def test_cuda_kernels_are_built_for_sm80_and_sm90():
    """Where nvcc was found at build time, the module carries cubins for both targets."""
    import os
    import shutil

    from rlkern import _ext

    core = _ext.load()
    if not core.with_cuda:
        pytest.skip("built without nvcc")
    tool = shutil.which("cuobjdump")
    try:
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        tool = bundled if os.path.exists(bundled) else tool
    except ImportError:
        pass
    if tool is None:
        pytest.skip("cuobjdump not found")
    listing = subprocess.run([tool, "--list-elf", core.__file__], capture_output=True, text=True, check=True).stdout
    assert "returns.sm_80.cubin" in listing and "returns.sm_90.cubin" in listing, listing
