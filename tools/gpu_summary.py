"""Summary of a tools/gpu_check.sh run: writes OUT/summary.md and OUT/bench.json, prints the summary.

    python tools/gpu_summary.py --mode gpu|dry-run --out DIR --parts parts.tsv \
        --junit junit.xml --bench part1.json [part2.json ...]

``parts.tsv`` holds one line per part (name, status, seconds, note) as gpu_check.sh
records them; the JUnit XML is pytest's; the bench files are ``rlkern bench --json``
outputs of single suites, merged here into one ``bench.json``. The summary says what
passed and failed, how long each part took, and per benchmarked op: rlkern's median
time, its achieved bandwidth against the bytes-moved model, the fraction of the copy
bandwidth measured in the same run, TFLOP/s where the op is matrix-bound, and each
competitor's time over rlkern's (above 1: rlkern is faster).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional


def read_parts(path: str) -> List[Dict[str, str]]:
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        header = f.readline().rstrip("\n").split("\t")
        for line in f:
            cells = line.rstrip("\n").split("\t")
            rows.append(dict(zip(header, cells + [""] * (len(header) - len(cells)))))
    return rows


def read_junit(path: str) -> Dict[str, object]:
    """Counts and the failed/errored tests (name, first line of the message) of a JUnit file."""
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": [], "skip_reasons": collections.Counter(),
           "slowest": []}
    if not path or not os.path.exists(path):
        return out
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        out["failed"].append(("junit.xml", f"unreadable: {e}"))
        return out
    durations = []
    for case in root.iter("testcase"):
        out["tests"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}".lstrip(":")
        durations.append((float(case.get("time") or 0.0), name))
        for tag, key in (("failure", "failures"), ("error", "errors")):
            for node in case.findall(tag):
                out[key] += 1
                message = (node.get("message") or node.text or "").strip().splitlines()
                out["failed"].append((name, message[0][:200] if message else tag))
        for node in case.findall("skipped"):
            out["skipped"] += 1
            out["skip_reasons"][(node.get("message") or "").strip()[:120]] += 1
    out["slowest"] = sorted(durations, reverse=True)[:5]
    return out


def merge_bench(paths: List[str]) -> Dict[str, object]:
    merged: Dict[str, object] = {"device": None, "torch": None, "copy_gbps": None, "results": [], "skipped": [],
                                 "suites": []}
    for path in paths:
        if not os.path.exists(path):
            continue
        with open(path) as f:
            data = json.load(f)
        for key in ("device", "torch"):
            merged[key] = merged[key] or data.get(key)
        if data.get("copy_gbps"):
            # One copy measurement per suite process: keep the largest, the least disturbed.
            merged["copy_gbps"] = max(merged["copy_gbps"] or 0.0, data["copy_gbps"])
        merged["results"].extend(data.get("results", []))
        merged["skipped"].extend(data.get("skipped", []))
        merged["suites"].append(os.path.basename(path))
    return merged


def _num(x: Optional[float], spec: str, empty: str = "-") -> str:
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return empty
    return format(x, spec)


def _gbps(x: Optional[float]) -> str:
    if x is None or math.isnan(x):
        return "-"
    return format(x, ",.0f") if x >= 100 else format(x, ".3g")


def bench_table(bench: Dict[str, object]) -> List[str]:
    by_case: Dict[tuple, List[dict]] = collections.OrderedDict()
    for r in bench["results"]:
        by_case.setdefault((r["suite"], r["op"], r["shape"]), []).append(r)
    lines = ["| op | shape | rlkern ms | GB/s | % of copy | TFLOP/s | competitors (their time / rlkern's) |",
             "|---|---|---:|---:|---:|---:|---|"]
    for (suite, op, shape), rows in by_case.items():
        ours = next((r for r in rows if r["impl"] == "rlkern"), None)
        if ours is None:
            continue
        roof = ours.get("roofline") or {}
        if ours.get("error"):
            ms = f"FAILED: {ours['error'][:80]}"
        else:
            ms = _num(ours["median_ms"], ".3f")
        others = []
        for r in rows:
            if r is ours:
                continue
            if r.get("error"):
                others.append(f"{r['impl']}: n/a ({r['error'][:70]})")
            else:
                others.append(f"{r['impl']} {_num(r.get('speedup'), '.2f')}x")
        frac = roof.get("copy_fraction")
        lines.append(f"| {suite}/{op} | {shape} | {ms} | {_gbps(roof.get('gbps'))} | "
                     f"{_num(None if frac is None else 100 * frac, '.0f')} | {_num(roof.get('tflops'), '.0f')} | "
                     f"{'; '.join(others).replace('|', '/')} |")
    return lines


def render(mode: str, parts: List[Dict[str, str]], junit: Dict[str, object], bench: Dict[str, object]) -> str:
    failed_parts = [p for p in parts if p["status"] in ("failed", "timeout") and p["part"] != "total"]
    verdict = "FAIL" if failed_parts or junit["failures"] or junit["errors"] else "PASS"
    out = []
    title = "rlkern GPU check" + (" (DRY RUN: no GPU, GPU parts skipped)" if mode != "gpu" else "")
    out.append(f"# {title}: {verdict}")
    out.append("")
    if mode != "gpu":
        out.append("No CUDA device: ran the CPU side only (the GPU tests on small CPU tensors with the Triton "
                   "kernels under the interpreter, the Triton-backend tests and the ahead-of-time compile unless "
                   "--lean, the memcheck script on the CPU without the sanitizer, a --quick CPU bench through "
                   "the same pipeline). GPU tests at real sizes, compute-sanitizer and GPU timings were SKIPPED.")
        out.append("")
    if bench.get("device"):
        out.append(f"Bench device: {bench['device']}, torch {bench['torch']}; measured copy bandwidth "
                   f"{_num(bench.get('copy_gbps'), ',.0f')} GB/s (bytes read + written).")
        out.append("")
    out.append("## Parts")
    out.append("| part | status | seconds | note |")
    out.append("|---|---|---:|---|")
    for p in parts:
        out.append(f"| {p['part']} | {p['status']} | {p['seconds']} | {p['note'].replace('|', '/')[:160]} |")
    out.append("")
    out.append("## Tests")
    passed = junit["tests"] - junit["failures"] - junit["errors"] - junit["skipped"]
    out.append(f"{passed} passed, {junit['failures']} failed, {junit['errors']} errors, {junit['skipped']} skipped "
               f"(of {junit['tests']} collected).")
    for name, message in junit["failed"][:20]:
        out.append(f"- FAILED {name}: {message}")
    if junit["skip_reasons"]:
        out.append("")
        out.append("Skipped, by reason: " + "; ".join(f"{n} x {reason or '(no reason)'}"
                                                      for reason, n in junit["skip_reasons"].most_common(6)))
    if junit["slowest"]:
        out.append("")
        out.append("Slowest: " + ", ".join(f"{name.split('::')[-1]} {t:.1f}s" for t, name in junit["slowest"]))
    out.append("")
    out.append("## Kernels" + (" (CPU smoke run: not GPU numbers)" if mode != "gpu" else ""))
    if bench["results"]:
        out.extend(bench_table(bench))
    else:
        out.append("No benchmark results.")
    if bench["skipped"]:
        out.append("")
        out.append(f"Not run (time limit), {len(bench['skipped'])} cases: " + "; ".join(bench["skipped"]))
    out.append("")
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="gpu")
    p.add_argument("--out", required=True)
    p.add_argument("--parts", default=None)
    p.add_argument("--junit", default=None)
    p.add_argument("--bench", nargs="*", default=[])
    args = p.parse_args(argv)
    parts = read_parts(args.parts or os.path.join(args.out, "parts.tsv"))
    junit = read_junit(args.junit or os.path.join(args.out, "junit.xml"))
    bench = merge_bench([b for b in args.bench if "*" not in b])
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(bench, f, indent=1)
    text = render(args.mode, parts, junit, bench)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
