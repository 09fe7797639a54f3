"""The benchmark suites run (small shapes) and report every implementation."""

import gc
import importlib.util
import json
import weakref

import pytest

from rlkern.bench.runner import SUITES
from rlkern.cli import main


@pytest.mark.parametrize("suite", [s for s in SUITES if importlib.util.find_spec(f"rlkern.bench.{s}") is not None])
def test_quick_bench_runs(suite, tmp_path, capsys):
    if suite == "adapters" and not any(importlib.util.find_spec(p) for p in ("verl", "openrlhf")):
        pytest.skip("the adapters suite compares against verl or OpenRLHF, and neither is installed")
    out = tmp_path / "bench.json"
    rc = main(["bench", "--only", suite, "--quick", "--budget", "0.05", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err[-3000:]
    assert gc.get_freeze_count() == 0, "the run left objects frozen out of the garbage collector"
    results = json.loads(out.read_text())["results"]
    ours = [r for r in results if r["impl"] == "rlkern"]
    assert ours and all(r["error"] is None and r["median_ms"] > 0 for r in ours)
    assert any(r["impl"] != "rlkern" for r in results), "a benchmark without a competitor"


def test_settle_heap_freezes_survivors_and_later_garbage_is_still_collected():
    """settle_heap takes what is alive now out of later collections (so that they walk only
    new objects), but garbage created afterwards, a reference cycle holding a tensor as a
    case's closures do, is still collected; unfreeze restores the collector's view."""
    from rlkern.bench.core import settle_heap

    class Holder:
        pass

    survivor = Holder()
    survivor.self = survivor
    try:
        settle_heap()
        assert gc.get_freeze_count() > 0
        garbage = Holder()
        garbage.self = garbage
        garbage.tensor = torch.ones(1 << 16)
        gone = weakref.ref(garbage)
        del garbage
        gc.collect()
        assert gone() is None, "a cycle created after settle_heap was not collected"
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0


# ---- what the runner prints and saves ------------------------------------------------------

import io  # noqa: E402
import re  # noqa: E402

import torch  # noqa: E402

from rlkern.bench import core, runner  # noqa: E402
from rlkern.bench.core import Case, Result  # noqa: E402


def _result(impl, median, q1=None, q3=None, speedup=None, suite="returns", op="gae", shape="8x8", **kw):
    return Result(suite, op, shape, impl, median, [median], q1_ms=q1 if q1 is not None else median,
                  q3_ms=q3 if q3 is not None else median, speedup=speedup, **kw)


def test_a_suite_with_nothing_to_run_says_so(monkeypatch, capsys):
    """A suite whose peers are not installed yields no case; the run names it instead of
    dropping it unseen."""
    import sys
    import types

    empty = types.ModuleType("rlkern.bench.trainers")
    empty.cases = lambda device, quick: []
    monkeypatch.setitem(sys.modules, "rlkern.bench.trainers", empty)
    assert runner.collect(["trainers"], torch.device("cpu"), True) == []
    assert "the trainers suite has nothing to run here" in capsys.readouterr().err


def test_plain_progress_line_per_case_with_time_left(tmp_path, capsys):
    # capsys' stdout is not a terminal: the run must print one line per case as it goes.
    out = tmp_path / "bench.json"
    rc = main(["bench", "--only", "returns", "--quick", "--budget", "0.02", "--no-memory", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    n = len({(r["op"], r["shape"]) for r in json.loads(out.read_text())["results"]})
    lines = re.findall(r"^\[(\d+)/(\d+)\] returns/\S+ .*rlkern [\d.]+ ms .*elapsed, about .* left\)$", text, re.M)
    assert [int(i) for i, _ in lines] == list(range(1, n + 1)) and {int(t) for _, t in lines} == {n}
    assert "machine load" in text


def test_json_carries_spread_load_and_versions(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--only", "returns", "--quick", "--budget", "0.02", "--no-memory", "--filter", "discounted",
                 "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    for key in ("device", "rlkern", "torch", "python", "date", "load_average"):
        assert saved[key] is not None
    for r in saved["results"]:
        if r["impl"] != "memory floor (copy)":
            assert r["q1_ms"] <= r["median_ms"] <= r["q3_ms"]


def test_competitors_get_as_many_torch_threads_as_rlkern(tmp_path, monkeypatch, capsys):
    """A run where torch has fewer intra-op threads than rlkern (OMP_NUM_THREADS=1) would time
    rlkern's threaded kernels against one-thread torch: the runner gives torch rlkern's count
    for the run, says so, records it, and gives the caller's setting back afterwards."""
    import torch

    import rlkern
    from rlkern.bench import core

    if rlkern.get_num_threads() < 2:
        pytest.skip("rlkern runs on one thread here: the counts cannot differ")
    seen = []
    real = core.measure

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(core, "measure", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path / "bench.json"
        assert main(["bench", "--only", "returns", "--quick", "--budget", "0.02", "--no-memory", "--filter",
                     "discounted", "--json", str(out)]) == 0
        assert torch.get_num_threads() == 1, "the caller's thread count was not restored"
    finally:
        torch.set_num_threads(before)
    err = capsys.readouterr().err
    assert seen and set(seen) == {rlkern.get_num_threads()}, err
    assert json.loads(out.read_text())["torch_threads"] == rlkern.get_num_threads()
    assert "torch runs with" in err


def test_quartiles_and_the_unsteady_flag():
    assert core.quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 4.0)
    assert core.quartiles([7.0]) == (7.0, 7.0)
    steady = _result("eager", 1.0, 0.95, 1.05)
    noisy = _result("eager", 1.0, 0.5, 3.0)
    assert not steady.unsteady and noisy.unsteady and noisy.spread == pytest.approx(2.5)
    notes = runner.footnotes([steady, noisy], load=[0.3, 5.0])
    assert any("machine load" in n and "0.3 -> 5.0" in n for n in notes)
    assert any(n.startswith("! 1 result") for n in notes)
    assert sum("spread 250%" in n for n in notes) == 1


def test_table_fits_the_terminal(monkeypatch):
    results = [_result("rlkern", 1.234, suite="logprobs", op="linear_token_logprobs+entropy fwd+bwd",
                       shape="2048x1024->65536 bf16"),
               _result("a competitor with a rather long descriptive name", 9.9, speedup=8.0, suite="logprobs",
                       op="linear_token_logprobs+entropy fwd+bwd", shape="2048x1024->65536 bf16")]
    for cols in (80, 100, 160):
        monkeypatch.setenv("COLUMNS", str(cols))
        buf = io.StringIO()
        runner.print_table(results, torch.device("cpu"), stream=buf)
        widest = max(len(line) for line in buf.getvalue().splitlines())
        assert widest <= cols, (cols, buf.getvalue())
    lines = runner.fit_plain(runner.HEADER, runner.table_rows(results), 90)
    assert max(map(len, lines)) <= 90 and "~" in "".join(lines)


def test_case_whose_predicted_peak_does_not_fit_is_skipped_with_a_note():
    calls = []

    def make(device):
        return {"rlkern": lambda: calls.append("rlkern"), "hungry": lambda: calls.append("hungry")}

    have = core.available_memory_mb(torch.device("cpu"))
    assert have is not None and have > 0
    case = Case("returns", "toy", "1", make, peak_mb_estimate={"hungry": have * 4, "rlkern": 1.0})
    results = core.run_case(case, torch.device("cpu"), budget_s=0.01, memory=False)
    by = {r.impl: r for r in results}
    assert "hungry" not in calls and "rlkern" in calls
    assert by["hungry"].skipped.startswith("skipped: needs about") and by["hungry"].speedup is None
    assert by["rlkern"].skipped is None and by["rlkern"].median_ms > 0
    assert any("hungry" in n and "skipped" in n for n in runner.footnotes(results))


def test_logprobs_peak_estimates_bound_the_measured_peaks():
    """The log-prob suite skips a method whose predicted peak does not fit; the prediction
    must be an upper bound of what the method really takes (measured here at a small
    shape), and the full-size eager case must be predicted as the ~19 GB it needs."""
    from rlkern.bench import logprobs as lp_bench

    # The calibration shape (64 MB per float32 copy; tiny shapes carry fixed overheads) in
    # float32, where the row-loop formulation takes the most.
    N, V = 512, 32768
    case = lp_bench._token_case(N, V, torch.float32, heavy=True, compile_eager=False)
    impls = case.make(torch.device("cpu"))
    for name, fn in impls.items():
        fn()  # first call: allocator and thread pool warm-up, not counted
        peak = core._peak_memory_mb(fn, torch.device("cpu"))
        if peak is None:
            pytest.skip("no RSS sampler in this build")
        # 10% slack: the sampler sees the process RSS, which moves by allocator pages and
        # by whatever else the process holds at the moment.
        assert peak <= case.peak_mb_estimate[name] * 1.1 + 4, (name, peak, case.peak_mb_estimate[name])
    big = lp_bench.cases(torch.device("cpu"), quick=False)[0]
    assert big.peak_mb_estimate["eager"] > 18 * 1024 > big.peak_mb_estimate["rlkern"] * 6


def test_bf16_linear_case_only_where_bf16_products_are_native(monkeypatch):
    """The bf16 linear log-prob case times the matrix products on both sides: it runs on a
    GPU, and on a CPU only with bf16 matrix instructions (torch's fallback GEMM took the
    case past 15 minutes on a 2-core AVX2 machine)."""
    from rlkern.bench import logprobs as lp_bench

    def shapes(device):
        return [c.shape for c in lp_bench.cases(device, quick=False) if c.op.startswith("linear_token_logprobs+")]

    for native in (False, True):
        monkeypatch.setattr(lp_bench, "_native_bf16_gemm", lambda device, native=native: native)
        assert shapes(torch.device("cpu")) == ["2048x1024->65536 bf16"] * native + ["2048x1024->65536 fp32"]
    monkeypatch.undo()
    assert lp_bench._native_bf16_gemm(torch.device("cuda"))
    with open("/proc/cpuinfo") as f:
        flags = set(f.read().split())
    assert lp_bench._native_bf16_gemm(torch.device("cpu")) == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_plot_groups_by_suite_and_keeps_floor_and_out_as_marks(tmp_path):
    pytest.importorskip("matplotlib")
    from rlkern.bench import plot

    results = [
        _result("rlkern", 1.0),
        _result("rlkern (out=)", 0.8, speedup=0.8),
        _result("memory floor (copy)", 0.5, speedup=0.5),
        _result("per-step loop", 40.0, speedup=40.0),
        _result("rlkern", 2.0, suite="losses", op="policy_loss", shape="4x4"),
        _result("eager", 6.0, speedup=3.0, suite="losses", op="policy_loss", shape="4x4"),
        _result("broken", float("nan"), suite="losses", op="policy_loss", shape="4x4", error="boom"),
    ]
    groups = plot.plot_groups(results)
    assert list(groups) == ["returns", "losses"]
    (_, bars, marks), = groups["returns"]
    assert [r.impl for r in bars] == ["per-step loop"]
    assert sorted(r.impl for r in marks) == ["memory floor (copy)", "rlkern (out=)"]
    assert [r.impl for r in groups["losses"][0][1]] == ["eager"]
    meta = {"device": "CPU (x86_64, 2 threads)", "rlkern": "0.1.0", "torch": "2.13.0", "python": "3.11.7",
            "date": "2026-11-30 21:00 UTC", "load_average": [0.5, 1.5], "cpu_count": 2}
    title = plot.figure_title(meta)
    for part in ("rlkern 0.1.0", "CPU (x86_64, 2 threads)", "torch 2.13.0", "2026-11-30", "load 1.5"):
        assert part in title
    path = tmp_path / "bench.png"
    assert plot.write_plot(results, str(path), meta)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plot.write_plot([_result("rlkern", 1.0)], str(tmp_path / "none.png"), meta)


def test_cases_wait_for_threads_a_competitor_left_busy():
    """A thread still burning CPU (as XLA's do for seconds after mctx's jit compile) holds
    the next measurement back until it stops; an idle process is not held."""
    import threading
    import time

    t0 = time.perf_counter()
    assert core.wait_until_process_idle(max_wait_s=5.0) < 1.0

    stop = time.perf_counter() + 0.6

    def spin():
        while time.perf_counter() < stop:
            pass

    worker = threading.Thread(target=spin)
    worker.start()
    try:
        waited = core.wait_until_process_idle(max_wait_s=5.0)
    finally:
        worker.join()
    assert 0.3 < waited < 4.0, waited
    assert time.perf_counter() - t0 < 5.0


def test_run_case_times_in_interleaved_rounds_and_keeps_slow_competitors_to_their_minimum():
    """Each implementation takes its turn in every round (a slow spell of a shared machine
    then lands on all of them), the medians pool the rounds, and one slower than a round's
    budget is called no more than its minimum of repeats (plus its warm-up)."""
    import itertools
    import time

    log = []

    def make(device):
        def fast():
            log.append("rlkern")

        def slow():
            log.append("slow")
            time.sleep(0.03)

        return {"rlkern": fast, "slow": slow}

    case = Case("returns", "toy", "1", make, warmup=1, min_repeats=2)
    results = core.run_case(case, torch.device("cpu"), budget_s=0.04, memory=False, rounds=4)
    by = {r.impl: r for r in results}
    assert [k for k, _ in itertools.groupby(log)] == ["rlkern", "slow", "rlkern", "slow", "rlkern"]
    assert log.count("slow") == 3 and len(by["slow"].times_ms) == 2
    assert by["slow"].speedup > 100 and by["rlkern"].error is None
