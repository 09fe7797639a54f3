import json
import os
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


def test_backend_variable_changed_at_run_time_is_seen(monkeypatch):
    """requested_backend keeps the variable's parsed value: a change through os.environ,
    unsetting included, must still take effect on the next call."""
    from rlkern import _backend

    monkeypatch.delenv("RLKERN_BACKEND", raising=False)
    assert _backend.requested_backend() == "auto"
    monkeypatch.setenv("RLKERN_BACKEND", " Reference ")
    assert _backend.requested_backend() == "reference"
    monkeypatch.setenv("RLKERN_BACKEND", "cpu")
    assert _backend.requested_backend() == "cpu"
    monkeypatch.setenv("RLKERN_BACKEND", "fortran")
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.requested_backend()
    monkeypatch.delenv("RLKERN_BACKEND")
    assert _backend.requested_backend() == "auto"


def test_cli_info_prints_json():
    out = subprocess.run([sys.executable, "-m", "rlkern.cli", "info"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["version"] == rlkern.__version__


def test_rss_sampler_sees_a_large_allocation():
    from rlkern import _ext

    from rlkern.bench.core import _release_freed_heap

    core = _ext.load()
    # Memory earlier tests freed may still be mapped and resident (malloc keeps it for
    # reuse), and a new tensor on it would not grow the RSS: hand it back first, as the
    # bench does before each measurement.
    _release_freed_heap()
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


# --- the thread pool under limits (issue 11, item 14) ---------------------------------

_POOL_PROBE = """
import os, resource, warnings
import torch, rlkern
from rlkern import _ext
threads = _ext.load().threads
r, v = torch.randn(3000, 64, dtype=torch.float64), torch.randn(3000, 64, dtype=torch.float64)
term = torch.rand(3000, 64) < 0.05
rlkern.set_num_threads(1)
serial = rlkern.gae(r, v, term, 0.99, 0.95)[0]

def check(n):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = rlkern.set_num_threads(n)
    assert 1 <= got <= threads.max_threads(), got
    assert got == rlkern.get_num_threads()
    assert torch.equal(rlkern.gae(r, v, term, 0.99, 0.95)[0], serial)
    running = len(os.listdir("/proc/self/task"))
    print(n, got, running, [str(w.message) for w in caught])
    return got, running, caught
"""


def test_thread_count_is_capped_with_a_warning():
    from rlkern import _ext

    cap = _ext.load().threads.max_threads()
    assert cap >= 4 * _ext.load().threads.hardware_threads()
    with pytest.warns(RuntimeWarning, match="capped at"):
        got = rlkern.set_num_threads(cap + 1)
    try:
        assert got == cap == rlkern.get_num_threads()
    finally:
        rlkern.set_num_threads(0)


def test_huge_thread_requests_neither_hang_nor_start_them_all():
    from helpers import run_isolated

    proc = run_isolated(_POOL_PROBE + """
for n in (100000, 3000, 2**40):
    got, running, caught = check(n)
    assert got == threads.max_threads() and running < got + 16, running
    assert any("capped" in str(w.message) for w in caught)
print("ok")
""", timeout=90)
    assert "ok" in proc.stdout


@pytest.mark.skipif(os.environ.get("RLKERN_ASAN") == "1",
                    reason="ASan reserves terabytes of shadow address space, so an address-space limit cannot "
                           "single out thread stacks")
def test_threads_refused_by_the_system_degrade_instead_of_hanging():
    """Under an address-space limit only a few 8 MiB thread stacks fit: the pool keeps
    the threads it could start, warns, and the results stay those of one thread."""
    from helpers import run_isolated

    proc = run_isolated(_POOL_PROBE + """
import re
vm = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 20 * 2**20, resource.RLIM_INFINITY))
got, running, caught = check(threads.max_threads())
assert got < threads.max_threads(), got
assert any("could be started" in str(w.message) for w in caught)
resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, resource.RLIM_INFINITY))
check(3000)
print("ok")
""", timeout=90)
    assert "ok" in proc.stdout


_OPENMP_PROBE = """
import os, sys, torch, rlkern
from rlkern import _ext
from rlkern.losses import policy_loss
threads = _ext.load().threads
if sys.platform != "linux" or "OpenMP" not in torch.__config__.parallel_info():
    print("skip: torch without OpenMP here")
    raise SystemExit(0)
g = torch.Generator().manual_seed(0)
r, v = torch.randn(3000, 64, generator=g, dtype=torch.float64), torch.randn(3000, 64, generator=g, dtype=torch.float64)
term = torch.rand(3000, 64, generator=g) < 0.05
lp = torch.randn(512, 1024, generator=g)
old = lp + 0.1 * torch.randn(512, 1024, generator=g)
adv = torch.randn(512, 1024, generator=g)
mask = torch.rand(512, 1024, generator=g) < 0.9

def run():
    x = lp.clone().requires_grad_()
    loss = policy_loss(x, old, adv, mask).loss
    loss.backward()
    return rlkern.gae(r, v, term, 0.99, 0.95)[0], loss.detach(), x.grad
"""


def test_kernels_run_on_torchs_openmp_team_when_the_thread_counts_match():
    """With torch's OpenMP runtime loaded and as many torch threads as rlkern's, the kernels
    run on torch's team (whose workers spin after each torch op and would otherwise compete
    with a second pool); with other counts, or RLKERN_POOL=own, on rlkern's own pool. The
    results are the same to the bit on either."""
    from helpers import run_isolated

    proc = run_isolated(_OPENMP_PROBE + """
rlkern.set_num_threads(3)
torch.set_num_threads(3)
assert threads.backend().startswith("openmp ("), threads.backend()
assert "omp" in threads.backend().rsplit("/", 1)[-1]
assert rlkern.info()["cpu_pool"] == threads.backend()
shared = run()
torch.set_num_threads(1)
assert threads.backend() == "rlkern", threads.backend()
own = run()
rlkern.set_num_threads(1)
serial = run()
for a, b, c in zip(shared, own, serial):
    assert torch.equal(a, b) and torch.equal(a, c)
print("ok")
""")
    assert "ok" in proc.stdout or "skip" in proc.stdout
    if "skip" in proc.stdout:
        pytest.skip(proc.stdout.strip())
    proc = run_isolated(_OPENMP_PROBE + """
torch.set_num_threads(rlkern.get_num_threads())
assert threads.backend() == "rlkern", threads.backend()
run()
print("ok")
""", env={"RLKERN_POOL": "own"})
    assert "ok" in proc.stdout


def test_an_unknown_pool_environment_value_warns_and_changes_nothing():
    from helpers import run_isolated

    proc = run_isolated("""
import sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, rlkern
from rlkern import _ext
assert any("RLKERN_POOL='Own'" in str(w.message) for w in caught), [str(w.message) for w in caught]
torch.set_num_threads(rlkern.get_num_threads())
expect_openmp = sys.platform == "linux" and "OpenMP" in torch.__config__.parallel_info()
assert _ext.load().threads.backend().startswith("openmp") == expect_openmp, _ext.load().threads.backend()
print("ok")
""", env={"RLKERN_POOL": "Own"})
    assert "ok" in proc.stdout


def test_a_child_forked_after_import_uses_rlkerns_own_pool():
    """An OpenMP team inherited through fork() has no threads in the child: a child forked
    after import runs the kernels on rlkern's own pool (restarted there) and finishes.
    (torch's own parallel ops hang in such a child, torch 2.13 with libgomp: the child
    runs an rlkern kernel and compares with numpy only.)"""
    from helpers import run_isolated

    proc = run_isolated(_OPENMP_PROBE + """
rlkern.set_num_threads(2)
torch.set_num_threads(2)
before = run()
pid = os.fork()
if pid == 0:
    try:
        ok = (threads.backend() == "rlkern"
              and rlkern.gae(r, v, term, 0.99, 0.95)[0].numpy().tobytes() == before[0].numpy().tobytes())
    except BaseException:
        ok = False
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
print("ok")
""", timeout=60)
    assert "ok" in proc.stdout or "skip" in proc.stdout


@pytest.mark.parametrize("value,expect", [("99999999999999", "capped"), ("512", "capped"),
                                          ("4x", "not a positive")])
def test_bad_thread_environment_values_warn_and_fall_back(value, expect):
    from helpers import run_isolated

    proc = run_isolated(f"""
import os, torch, rlkern
from rlkern import _ext
threads = _ext.load().threads
n = rlkern.get_num_threads()
want = threads.max_threads() if {expect!r} == "capped" else threads.hardware_threads()
assert n == want, (n, want)
r, v = torch.randn(3000, 64), torch.randn(3000, 64)
rlkern.gae(r, v, torch.zeros(3000, 64, dtype=torch.bool), 0.99, 0.95)
assert len(os.listdir("/proc/self/task")) < n + 16
print("ok", n)
""", timeout=90, env={"RLKERN_NUM_THREADS": value})
    assert "ok" in proc.stdout and expect in proc.stderr, proc.stderr
