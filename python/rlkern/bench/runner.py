"""Command-line runner: discovers the suites, runs them, prints and saves the results."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import math
import os
import platform
import shutil
import sys
import textwrap
import time
from typing import List, Optional, Sequence

import torch

from .core import SPREAD_LIMIT, Case, Result, load_average, run_case, settle_heap

SUITES = ("returns", "losses", "logprobs", "mcts", "selfplay", "e2e", "compiled", "adapters", "trainers")
GPU_SUITES = ("gpu",)  # GPU-only competitors (Liger-Kernel, mctx on the GPU); part of the default on CUDA


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", nargs="*", choices=SUITES + GPU_SUITES, help="suites to run (default: all)")
    p.add_argument("--filter", default=None, help="run only cases whose op contains this text")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quick", action="store_true",
                   help="small shapes only and no torch.compile competitors: a smoke run of a few minutes, "
                        "not a measurement")
    p.add_argument("--budget", type=float, default=1.5, help="seconds of timed repeats per implementation")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--plot", default=None,
                   help="write a PNG figure of the speed-ups, grouped by suite, to this file (needs matplotlib)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--time-limit", type=float, default=None,
                   help="start no case after this many seconds; the rest are listed as skipped")


def collect(suites, device: torch.device, quick: bool) -> List[Case]:
    cases: List[Case] = []
    for name in suites:
        try:
            module = importlib.import_module(f"rlkern.bench.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"rlkern.bench.{name}":
                continue
            raise
        found = module.cases(device, quick)
        if not found:
            # A suite whose competitors are peers (TRL for `trainers`, verl or OpenRLHF for
            # `adapters`) has no case without them: say so rather than leave it out unseen.
            print(f"rlkern bench: the {name} suite has nothing to run here (the packages it compares against "
                  "are not installed: see the README's Benchmarks section)", file=sys.stderr)
        cases.extend(found)
    return cases


class _Progress:
    """Where the run is. On a terminal with rich installed: a live progress bar with the
    time left. Otherwise (output to a file or a pipe, or no rich): one plain line per
    finished case on stdout, flushed at once, with its result and an estimate of the
    time left, so a long run written to a log shows what it is doing."""

    def __init__(self, total: int, stream=None):
        self.total = total
        self.done = 0
        self.stream = stream if stream is not None else sys.stdout
        self.start = time.monotonic()
        self._rich = None
        if _is_terminal(self.stream):
            try:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

                self._rich = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeRemainingColumn(), transient=True)
                self._task = self._rich.add_task("benchmarks", total=total)
                self._rich.start()
            except ImportError:
                self._rich = None

    def step(self, label: str) -> None:
        if self._rich is not None:
            self._rich.update(self._task, description=label)

    def advance(self, label: str = "", results: Sequence[Result] = ()) -> None:
        self.done += 1
        if self._rich is not None:
            self._rich.advance(self._task)
            return
        elapsed = time.monotonic() - self.start
        left = elapsed / self.done * (self.total - self.done)
        print(f"[{self.done}/{self.total}] {label}: {case_summary(results)} "
              f"({_duration(elapsed)} elapsed, about {_duration(left)} left)", file=self.stream, flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def case_summary(results: Sequence[Result]) -> str:
    """One case in a few words: rlkern's median and spread, and how it compares."""
    ours = next((r for r in results if r.impl == "rlkern"), None)
    if ours is None:
        return "no rlkern result"
    if ours.error or ours.skipped:
        return f"rlkern {ours.error or ours.skipped}"
    parts = [f"rlkern {_fmt(ours.median_ms, '.3f')} ms ({_fmt(ours.q1_ms, '.3f')}-{_fmt(ours.q3_ms, '.3f')})"]
    rivals = [r for r in results if r.impl != "rlkern" and not r.impl.startswith("rlkern") and r.speedup
              and not _is_floor(r)]
    if rivals:
        best = min(rivals, key=lambda r: r.speedup)
        parts.append(f"{best.speedup:.2f}x faster than {best.impl}" if best.speedup >= 1
                     else f"{1 / best.speedup:.2f}x slower than {best.impl}")
    unsteady = [r.impl for r in results if r.unsteady]
    if unsteady:
        parts.append("spread too wide: " + ", ".join(unsteady))
    return "; ".join(parts)


def _is_floor(r: Result) -> bool:
    return r.impl.startswith("memory floor")


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


HEADER = ["op", "shape", "impl", "median ms", "q1-q3 ms", "speed-up", "peak MB", "throughput"]
LEGEND = ("speed-up: competitor time / rlkern time (above 1: rlkern faster); peak MB: extra memory at the call's peak; "
          "q1-q3: middle half of the timed repeats")


def table_rows(results: List[Result]) -> List[List[str]]:
    rows = []
    for r in results:
        thr = f"{r.throughput:,.0f} {r.unit}" if r.throughput else ""
        speed = "" if r.impl == "rlkern" else (_fmt(r.speedup, ".2f") + "x" if r.speedup else "-")
        note = r.skipped or r.error
        impl = r.impl if not note else f"{r.impl} ({note[:60]})"
        spread = f"{_fmt(r.q1_ms, '.3f')}-{_fmt(r.q3_ms, '.3f')}" if r.q1_ms is not None else "-"
        if r.unsteady:
            spread += " !"
        rows.append([f"{r.suite}/{r.op}", r.shape, impl, _fmt(r.median_ms, ".3f"), spread, speed,
                     _fmt(r.peak_mb, ".1f"), thr])
    return rows


def terminal_width() -> int:
    """Columns to fit: the terminal's, or COLUMNS, else 120 (a log file or a pipe)."""
    return shutil.get_terminal_size(fallback=(120, 24)).columns


def fit_plain(header: List[str], rows: List[List[str]], width: int) -> List[str]:
    """A plain-text table no wider than ``width``: the widest text columns (op, impl)
    give up characters first, cut with '~'."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    sep = 2
    shrinkable = [0, 2, 1, 7]  # op, impl, shape, throughput
    while sum(widths) + sep * (len(widths) - 1) > width:
        i = max(shrinkable, key=lambda k: widths[k])
        if widths[i] <= max(len(header[i]), 8):
            break
        widths[i] -= 1

    def cut(text: str, w: int) -> str:
        return text if len(text) <= w else text[: w - 1] + "~"

    numeric = set(range(3, len(header)))
    lines = []
    for row in [header] + rows:
        cells = [cut(c, w).rjust(w) if i in numeric else cut(c, w).ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append((" " * sep).join(cells).rstrip())
    return lines


def print_table(results: List[Result], device: torch.device, load: Sequence[Optional[float]] = (),
                stream=None) -> None:
    stream = stream if stream is not None else sys.stdout
    rows = table_rows(results)
    title = f"rlkern bench on {device_label(device)}"
    width = terminal_width()
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for h in HEADER:
            table.add_column(h, justify="left" if h in ("op", "shape", "impl") else "right",
                             overflow="fold")
        for row in rows:
            table.add_row(*row)
        Console(file=stream, width=width).print(table)
    except ImportError:
        print(title, file=stream)
        for line in fit_plain(HEADER, rows, width):
            print(line, file=stream)
    for line in footnotes(results, load):
        indent = " " * (len(line) - len(line.lstrip()))
        print(textwrap.fill(line, width, subsequent_indent=indent + "  "), file=stream)


def footnotes(results: List[Result], load: Sequence[Optional[float]] = ()) -> List[str]:
    """The lines under the table: the machine's load and the results not to trust."""
    lines = [LEGEND]
    known = [x for x in load if x is not None]
    if known:
        cores = os.cpu_count() or 1
        lines.append(f"machine load (1-min average) {' -> '.join(f'{x:.1f}' for x in known)} on {cores} cores"
                     + (": other work was running, timings are inflated and noisy" if max(known) > 0.5 * cores else ""))
    unsteady = [r for r in results if r.unsteady]
    if unsteady:
        lines.append(f"! {len(unsteady)} result(s) with (q3 - q1) / median > {SPREAD_LIMIT:.0%}: too noisy to trust, "
                     "rerun on an idle machine (or with a larger --budget):")
        lines.extend(f"    {r.suite}/{r.op} {r.shape} {r.impl}: spread {r.spread:.0%}" for r in unsteady)
    skipped = [r for r in results if r.skipped]
    lines.extend(f"{r.suite}/{r.op} {r.shape} {r.impl}: {r.skipped}" for r in skipped)
    return lines


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from .. import get_num_threads

    return f"CPU ({platform.processor() or platform.machine()}, {get_num_threads()} threads)"


def run_metadata(device: torch.device, load: Sequence[Optional[float]], torch_threads: int) -> dict:
    """What a saved result or a figure needs to be read later: where, with what, when."""
    from .. import __version__

    return {"device": device_label(device), "rlkern": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average": list(load), "cpu_count": os.cpu_count(),
            "torch_threads": torch_threads}


def match_torch_threads(device: torch.device) -> Optional[int]:
    """On the CPU, gives torch's intra-op pool as many threads as rlkern's kernels use, so that
    the eager and compiled competitors run on the same cores as rlkern (OMP_NUM_THREADS=1
    alone would time two-thread kernels against one-thread torch). Returns torch's count
    before, for the caller to restore, or None when nothing changed."""
    if device.type != "cpu":
        return None
    from .. import get_num_threads

    ours, theirs = get_num_threads(), torch.get_num_threads()
    if ours == theirs:
        return None
    print(f"rlkern bench: torch had {theirs} intra-op thread(s) and rlkern {ours}; torch runs with {ours} for "
          "this run so that every competitor gets the same cores (RLKERN_NUM_THREADS sets both)",
          file=sys.stderr)
    torch.set_num_threads(ours)
    return theirs


def run_from_args(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from . import bandwidth

    cases = collect(args.only or (SUITES + (GPU_SUITES if device.type == "cuda" else ())), device, args.quick)
    if args.filter:
        cases = [c for c in cases if args.filter in c.op]
    if not cases:
        print("no benchmark cases matched", file=sys.stderr)
        return 1
    load = [load_average()]
    copy_gbps = bandwidth.copy_bandwidth(device)
    progress = _Progress(len(cases))
    results: List[Result] = []
    skipped: List[str] = []
    began = time.perf_counter()
    torch_threads = match_torch_threads(device)
    run_threads = torch.get_num_threads()
    settle_heap()
    try:
        for case in cases:
            label = f"{case.suite}/{case.op} {case.shape}"
            if args.time_limit is not None and time.perf_counter() - began > args.time_limit:
                skipped.append(label)
                continue
            progress.step(label)
            done = bandwidth.annotate(case, run_case(case, device, budget_s=args.budget, memory=not args.no_memory),
                                      copy_gbps)
            settle_heap()  # the modules this case imported leave the next cases' collections
            results.extend(done)
            progress.advance(label, done)
    finally:
        progress.close()
        gc.unfreeze()  # hand the objects settle_heap froze back to the collector
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
    load.append(load_average())
    print_table(results, device, load)
    bandwidth.print_table(results, copy_gbps)
    meta = run_metadata(device, load, run_threads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**meta, "copy_gbps": copy_gbps, "results": [dataclasses.asdict(r) for r in results],
                       "skipped": skipped}, f, indent=1)
    if args.plot:
        from .plot import write_plot

        write_plot(results, args.plot, meta)
    if skipped:
        print(f"time limit: skipped {len(skipped)} cases: {'; '.join(skipped)}", file=sys.stderr)
    failed = [r for r in results if r.impl == "rlkern" and r.error]
    for r in failed:
        print(f"rlkern failed on {r.op} {r.shape}: {r.error}", file=sys.stderr)
    return 1 if failed else 0
