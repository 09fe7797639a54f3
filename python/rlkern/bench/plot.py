"""The ``rlkern bench --plot`` figure: rlkern's speed-up over each competitor.

One panel per suite, one group of bars per case, one bar per competitor, with its
value written on it. The memory floor (a copy of the bytes the kernel must move) and
rlkern's own ``out=`` variant are not competitors: they are drawn as reference marks on
their case's bars (the speed-up an implementation running at the floor would show), so
no bar reads as rlkern losing to itself or to a memcpy.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

from .core import Result

# Marks, not bars: rlkern's variants and the memory floor.
_REFERENCE_PREFIXES = ("rlkern", "memory floor")


def is_reference(r: Result) -> bool:
    return r.impl.startswith(_REFERENCE_PREFIXES)


def _ok(x: Optional[float]) -> bool:
    return x is not None and not math.isnan(x) and x > 0


def plot_groups(results: Sequence[Result]) -> Dict[str, List[Tuple[str, List[Result], List[Result]]]]:
    """``{suite: [(case label, competitor bars, reference marks)]}`` in run order; a case
    without a measured competitor is left out."""
    groups: Dict[str, List[Tuple[str, List[Result], List[Result]]]] = {}
    cases: Dict[Tuple[str, str, str], Tuple[List[Result], List[Result]]] = {}
    for r in results:
        key = (r.suite, r.op, r.shape)
        bars, marks = cases.setdefault(key, ([], []))
        if r.impl == "rlkern" or not _ok(r.speedup):
            continue
        (marks if is_reference(r) else bars).append(r)
    for (suite, op, shape), (bars, marks) in cases.items():
        if bars:
            groups.setdefault(suite, []).append((f"{op}\n{shape}", bars, marks))
    return groups


def figure_title(meta: Dict) -> str:
    parts = [f"rlkern {meta.get('rlkern', '?')} on {meta.get('device', '?')}",
             f"torch {meta.get('torch', '?')}, Python {meta.get('python', '?')}", meta.get("date", "")]
    load = [x for x in meta.get("load_average", []) if x is not None]
    if load:
        parts.append(f"load {max(load):.1f} on {meta.get('cpu_count', '?')} cores")
    return " | ".join(p for p in parts if p)


def write_plot(results: Sequence[Result], path: str, meta: Optional[Dict] = None) -> bool:
    """Writes the figure to ``path`` (PNG, or any format matplotlib infers from the
    suffix); False when nothing had a competitor to compare with."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = plot_groups(results)
    if not groups:
        return False
    heights = [sum(len(bars) + 1 for _, bars, _ in cases) for cases in groups.values()]
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, 0.32 * sum(heights) + 1.6 * len(groups) + 1),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    all_x = [r.speedup for cases in groups.values() for _, bars, marks in cases for r in bars + marks]
    top_x = max(all_x + [1.0])
    lo, hi = min(all_x + [1.0]) / 1.6, top_x * 60  # room for the labels right of the longest bar
    labelled = set()
    for ax, (suite, cases) in zip(axes[:, 0], groups.items()):
        y = 0.0
        ticks, tick_labels = [], []
        for label, bars, marks in cases:
            top = y
            for r in bars:
                unsteady = r.unsteady
                ax.barh(y, r.speedup, height=0.8, color=colors[0] if r.speedup >= 1 else colors[3],
                        hatch="//" if unsteady else None, edgecolor="white")
                text = f"{r.speedup:.1f}x" if r.speedup < 100 else f"{r.speedup:,.0f}x"
                ax.text(r.speedup * 1.04, y, f"{text}  {r.impl}" + (" (noisy)" if unsteady else ""),
                        va="center", fontsize=7)
                y += 1
            for r in marks:
                floor = r.impl.startswith("memory floor")
                name = "memory floor (copy of the same bytes)" if floor else "rlkern with out= buffers"
                ax.vlines(r.speedup, top - 0.5, y - 0.5, colors="k" if floor else colors[2],
                          linestyles="--" if floor else ":", lw=1.8, label=None if name in labelled else name)
                labelled.add(name)
            ticks.append((top + y - 1) / 2)
            tick_labels.append(label)
            y += 1
        ax.axvline(1.0, color="0.4", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.set_yticks(ticks, tick_labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(suite, loc="left", fontsize=10, fontweight="bold")
        ax.grid(axis="x", which="major", alpha=0.3)
    axes[-1, 0].set_xlabel("rlkern speed-up: competitor time / rlkern time (log scale; right of 1 = rlkern faster)")
    handles = [h for ax in axes[:, 0] for h in ax.get_legend_handles_labels()[0]]
    names = [n for ax in axes[:, 0] for n in ax.get_legend_handles_labels()[1]]
    if handles:
        fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.975), ncol=len(handles), fontsize=8,
                   frameon=False)
    fig.suptitle(figure_title(meta or {}), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=130, bbox_inches="tight")  # long labels right of the longest bars stay in
    plt.close(fig)
    return True
