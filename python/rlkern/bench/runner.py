"""Command-line runner: discovers the suites, runs them, prints and saves the results."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import platform
import sys
import time
from typing import List, Optional

import torch

from .core import Case, Result, run_case

SUITES = ("returns", "losses", "logprobs", "mcts", "e2e")
GPU_SUITES = ("gpu",)  # GPU-only competitors (Liger-Kernel, mctx on the GPU); part of the default on CUDA


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", nargs="*", choices=SUITES + GPU_SUITES, help="suites to run (default: all)")
    p.add_argument("--filter", default=None, help="run only cases whose op contains this text")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="small shapes only (a smoke run)")
    p.add_argument("--budget", type=float, default=1.5, help="seconds of timed repeats per implementation")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--plot", default=None, help="write a PNG bar chart of speed-ups to this file")
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
        cases.extend(module.cases(device, quick))
    return cases


class _Progress:
    """rich's progress bar when rich is installed, one line per case otherwise."""

    def __init__(self, total: int):
        self.total = total
        self.done = 0
        try:
            from rich.progress import Progress

            self._rich = Progress(transient=True)
            self._task = self._rich.add_task("benchmarks", total=total)
            self._rich.start()
        except ImportError:
            self._rich = None

    def step(self, label: str) -> None:
        if self._rich is not None:
            self._rich.update(self._task, description=label)
        else:
            print(f"[{self.done + 1}/{self.total}] {label}", file=sys.stderr, flush=True)

    def advance(self) -> None:
        self.done += 1
        if self._rich is not None:
            self._rich.advance(self._task)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_table(results: List[Result], device: torch.device) -> None:
    header = ["op", "shape", "impl", "median ms", "rlkern speed-up", "peak extra MB", "throughput"]
    rows = []
    for r in results:
        thr = f"{r.throughput:,.0f} {r.unit}" if r.throughput else ""
        speed = "" if r.impl == "rlkern" else (_fmt(r.speedup, ".2f") + "x" if r.speedup else "-")
        rows.append([f"{r.suite}/{r.op}", r.shape, r.impl if not r.error else f"{r.impl} ({r.error[:60]})",
                     _fmt(r.median_ms, ".3f"), speed, _fmt(r.peak_mb, ".1f"), thr])
    title = f"rlkern bench on {device_label(device)}"
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for h in header:
            table.add_column(h, justify="left" if h in ("op", "shape", "impl") else "right")
        for row in rows:
            table.add_row(*row)
        Console(width=200).print(table)
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        print(title)
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from .. import get_num_threads

    return f"CPU ({platform.processor() or platform.machine()}, {get_num_threads()} threads)"


def write_plot(results: List[Result], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{r.op} {r.shape}\nvs {r.impl}", r.speedup) for r in results
            if r.impl != "rlkern" and r.speedup and not math.isnan(r.speedup)]
    if not bars:
        return
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(bars) + 1.5))
    ax.barh([b[0] for b in bars], [b[1] for b in bars])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("rlkern speed-up (competitor time / rlkern time)")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_from_args(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from . import bandwidth

    cases = collect(args.only or (SUITES + (GPU_SUITES if device.type == "cuda" else ())), device, args.quick)
    if args.filter:
        cases = [c for c in cases if args.filter in c.op]
    if not cases:
        print("no benchmark cases matched", file=sys.stderr)
        return 1
    copy_gbps = bandwidth.copy_bandwidth(device)
    progress = _Progress(len(cases))
    results: List[Result] = []
    skipped: List[str] = []
    began = time.perf_counter()
    try:
        for case in cases:
            if args.time_limit is not None and time.perf_counter() - began > args.time_limit:
                skipped.append(f"{case.suite}/{case.op} {case.shape}")
                continue
            progress.step(f"{case.suite}/{case.op} {case.shape}")
            results.extend(bandwidth.annotate(case, run_case(case, device, budget_s=args.budget,
                                                             memory=not args.no_memory), copy_gbps))
            progress.advance()
    finally:
        progress.close()
    print_table(results, device)
    bandwidth.print_table(results, copy_gbps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_label(device), "torch": torch.__version__, "copy_gbps": copy_gbps,
                       "results": [dataclasses.asdict(r) for r in results], "skipped": skipped}, f, indent=1)
    if args.plot:
        write_plot(results, args.plot)
    if skipped:
        print(f"time limit: skipped {len(skipped)} cases: {'; '.join(skipped)}", file=sys.stderr)
    failed = [r for r in results if r.impl == "rlkern" and r.error]
    for r in failed:
        print(f"rlkern failed on {r.op} {r.shape}: {r.error}", file=sys.stderr)
    return 1 if failed else 0
