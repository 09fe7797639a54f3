"""Timing and memory measurement shared by every benchmark suite."""

from __future__ import annotations

import gc
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

Impl = Callable[[], object]


@dataclass
class Case:
    """One benchmark: an op at one shape.

    ``make(device)`` allocates the inputs and returns ``{name: zero-argument callable}``
    with ``"rlkern"`` first; the other entries are competitors. A competitor that cannot
    run here (a missing package) is simply left out. ``items`` and ``unit`` turn times
    into a throughput (for example simulations per second).
    """

    suite: str
    op: str
    shape: str
    make: Callable[[torch.device], Dict[str, Impl]]
    items: Optional[float] = None
    unit: str = ""
    note: str = ""
    # Fewer calls for cases where one call takes many seconds (defaults as in measure).
    warmup: int = 2
    min_repeats: int = 5
    # Predicted peak extra memory in MB per implementation name: an implementation whose
    # prediction exceeds the memory available when the case starts is skipped with a
    # note instead of being run into the OOM killer (see skip_for_memory).
    peak_mb_estimate: Optional[Dict[str, float]] = None


@dataclass
class Result:
    suite: str
    op: str
    shape: str
    impl: str
    median_ms: float
    times_ms: List[float] = field(default_factory=list)
    peak_mb: Optional[float] = None
    speedup: Optional[float] = None  # competitor time / rlkern time
    throughput: Optional[float] = None
    unit: str = ""
    error: Optional[str] = None
    # Set by bench.bandwidth.annotate: model bytes/flops, GB/s, TFLOP/s, fraction of copy bandwidth.
    roofline: Optional[Dict[str, Optional[float]]] = None
    # Interquartile range of the timed repeats (see quartiles) and why a run was skipped.
    q1_ms: Optional[float] = None
    q3_ms: Optional[float] = None
    skipped: Optional[str] = None

    @property
    def spread(self) -> Optional[float]:
        """(q3 - q1) / median: the relative width of the middle half of the timings."""
        if self.q1_ms is None or self.q3_ms is None or not self.median_ms or self.median_ms != self.median_ms:
            return None
        return (self.q3_ms - self.q1_ms) / self.median_ms

    @property
    def unsteady(self) -> bool:
        """Timings too scattered for the median to be trusted (see SPREAD_LIMIT)."""
        return self.spread is not None and self.spread > SPREAD_LIMIT


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release_freed_heap() -> None:
    """Hand freed malloc pages back to the OS (glibc), so that a call reusing memory an
    earlier competitor freed shows up in the RSS instead of looking free."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def settle_heap() -> None:
    """Collects the garbage the last case left, then moves every object still alive (imported
    modules, torch's and the peers' caches) to the collector's permanent generation, so that
    later collections walk only the objects created since. With torch, verl and OpenRLHF
    imported a full collection walks about half a million objects (0.4 s on the 2-core CI
    machine), and a case collects once per implementation before measuring its memory: most
    of a ``--quick`` run's time went there. A frozen object is still freed when its last
    reference goes; only a reference cycle among frozen objects waits for ``gc.unfreeze()``,
    which the caller owes once its cases are done (``run_from_args`` calls this between
    cases, when no implementation's tensors are alive, and unfreezes when the run ends)."""
    gc.collect()
    gc.freeze()


def _peak_memory_mb(fn: Impl, device: torch.device) -> Optional[float]:
    """Extra memory the call needs beyond what was allocated before it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del out
        return (peak - base) / 2**20
    try:
        from .. import _ext

        core = _ext.load()
    except ImportError:
        return None
    _release_freed_heap()
    sampler = core.bench.RssSampler()
    base = core.bench.current_rss()
    sampler.start(100.0)
    out = fn()
    peak = sampler.stop()
    del out
    if base < 0 or peak < 0:
        return None
    return max(peak - base, 0) / 2**20


def measure(fn: Impl, device: torch.device, *, warmup: int = 2, min_repeats: int = 5,
            max_repeats: int = 500, budget_s: float = 1.5, warm_s: Optional[float] = None) -> List[float]:
    """Times in milliseconds: untimed calls (``warmup`` of them and at least 0.5 s, or twice
    ``budget_s`` when that is less, so
    caches, the thread pool, the allocator and the OS's page recycling reach the steady
    state of a training loop: on the VMs we measure on, the first few hundred
    milliseconds of fresh 32 MB outputs land on memory the host has never backed and
    fault 4x slower), then repeats until the time
    budget is spent (at least ``min_repeats``, at most ``max_repeats``: sub-millisecond
    ops get hundreds of samples, which keeps their median steady on a shared machine).
    ``warm_s`` replaces the untimed half second (0 for a function warmed up already)."""
    start = time.perf_counter()
    done = 0
    # A run with a tiny budget (a smoke test: --quick --budget 0.05) is not a measurement,
    # and half a second of warm-up per competitor would be most of its time.
    if warm_s is None:
        warm_s = min(0.5, 2 * budget_s)
    while done < warmup or time.perf_counter() - start < warm_s:
        fn()
        done += 1
    _sync(device)
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - start < budget_s):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _process_cpu_s() -> float:
    """CPU seconds used so far by all of this process's threads (getrusage counts in
    microseconds; os.times, the fallback off Unix, in clock ticks of 10 ms)."""
    try:
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    except ImportError:
        t = os.times()
        return t.user + t.system


def wait_until_process_idle(max_wait_s: float = 10.0, window_s: float = 0.05, busy_fraction: float = 0.1) -> float:
    """Waits (at most ``max_wait_s``) until this process's threads, all of them, use less
    than ``busy_fraction`` of one core over a ``window_s`` window; returns the seconds waited.

    A JIT-compiling competitor leaves threads working after its call returns: after mctx's
    ``jax.jit`` compile XLA's threads keep both cores of a 2-core machine busy for about two
    seconds, which is the whole warm-up and timing budget of the implementation measured
    next; measured inside that window rlkern's 256x362 Gumbel search read 3x slower."""
    start = time.perf_counter()
    while True:
        c0, t0 = _process_cpu_s(), time.perf_counter()
        time.sleep(window_s)
        busy = (_process_cpu_s() - c0) / max(time.perf_counter() - t0, 1e-9)
        waited = time.perf_counter() - start
        if busy < busy_fraction or waited >= max_wait_s:
            return waited


# Timed rounds per case: each implementation gets budget_s / ROUNDS of repeats in every round,
# in turn, so that a slow spell of a shared machine (seconds long) lands on every competitor
# alike instead of on whichever was being timed; their ratio is what the suite reports.
ROUNDS = 4


def _share(total: int, rounds: int, r: int) -> int:
    """Round r's part of ``total`` repeats split over ``rounds`` (the parts add up to total)."""
    return total // rounds + (1 if r < total % rounds else 0)


def run_case(case: Case, device: torch.device, *, budget_s: float = 1.5, memory: bool = True,
             rounds: int = ROUNDS) -> List[Result]:
    """Times every implementation of ``case``: a warm-up each, then ``rounds`` rounds in which
    each takes its turn for ``budget_s / rounds`` seconds (at least its share of
    ``case.min_repeats``); the medians pool all rounds. Then the peak memory of each."""
    impls = case.make(device)
    skipped: Dict[str, str] = {}
    errors: Dict[str, str] = {}
    times: Dict[str, List[float]] = {}
    for name in impls:
        skip = skip_for_memory(case, name, device)
        if skip is not None:
            skipped[name] = skip
        else:
            times[name] = []
    for r in range(rounds):
        for name, fn in impls.items():
            if name not in times or name in errors:
                continue
            share = _share(case.min_repeats, rounds, r)
            # an implementation slower than a round's budget that has its minimum of repeats
            # already is not called again (a 10-second competitor keeps its few calls)
            if share == 0 and times[name] and statistics.median(times[name]) > 1e3 * budget_s / rounds:
                continue
            # Also before a GPU competitor: its launches run on the host's cores.
            wait_until_process_idle()
            try:
                times[name] += measure(fn, device, warmup=case.warmup if r == 0 else 0,
                                       min_repeats=share,
                                       max_repeats=_share(500, rounds, r), budget_s=budget_s / rounds,
                                       warm_s=None if r == 0 else 0.0)
            except Exception as e:  # a competitor failing must not hide the others
                errors[name] = f"{type(e).__name__}: {e}"
    results: List[Result] = []
    for name, fn in impls.items():
        if name in skipped:
            results.append(Result(case.suite, case.op, case.shape, name, float("nan"), skipped=skipped[name]))
            continue
        if name in errors:
            results.append(Result(case.suite, case.op, case.shape, name, float("nan"), error=errors[name]))
            continue
        try:
            peak = _peak_memory_mb(fn, device) if memory else None
        except Exception as e:
            results.append(Result(case.suite, case.op, case.shape, name, float("nan"),
                                  error=f"{type(e).__name__}: {e}"))
            continue
        ts = times[name]
        med = statistics.median(ts)
        q1, q3 = quartiles(ts)
        results.append(Result(case.suite, case.op, case.shape, name, med, ts, peak,
                              throughput=(case.items / (med / 1e3)) if case.items else None, unit=case.unit,
                              q1_ms=q1, q3_ms=q3))
    del impls
    gc.collect()
    ours = next((r for r in results if r.impl == "rlkern" and r.error is None and r.skipped is None), None)
    for r in results:
        if ours is not None and r.error is None and r.skipped is None:
            r.speedup = r.median_ms / ours.median_ms
    return results


# ---- spread, machine load and memory headroom ---------------------------------------------

# A case whose timings' interquartile range exceeds this fraction of the median is flagged:
# on a machine shared with other jobs a competitor's time can swing by 100x between runs.
SPREAD_LIMIT = 0.25


def quartiles(times: List[float]) -> "tuple[float, float]":
    """First and third quartiles of the timings (inclusive method: defined from one sample on)."""
    if len(times) == 1:
        return times[0], times[0]
    q = statistics.quantiles(times, n=4, method="inclusive")
    return q[0], q[2]


def load_average() -> Optional[float]:
    """The 1-minute load average (runnable processes), None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def available_memory_mb(device: torch.device) -> Optional[float]:
    """Memory a new allocation can still get: free device memory on a GPU, the kernel's
    MemAvailable estimate on Linux; None when unknown (then nothing is skipped)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free / 2**20
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def skip_for_memory(case: Case, impl: str, device: torch.device) -> Optional[str]:
    """A note saying why ``impl`` is not run, when its predicted peak does not fit."""
    if not case.peak_mb_estimate or impl not in case.peak_mb_estimate:
        return None
    need = case.peak_mb_estimate[impl]
    have = available_memory_mb(device)
    if have is None or need <= have:
        return None
    return f"skipped: needs about {need / 1024:.1f} GB, {have / 1024:.1f} GB available"
