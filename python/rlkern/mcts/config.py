"""Search configuration (one dataclass; every default is written once, here)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

ALGORITHMS = ("puct", "gumbel")
FLOAT32_MAX = 3.4028234663852886e38  # the core computes in float32
INT32_MAX = 2**31 - 1


def _number(name: str, value, *, low: float = -math.inf, high: float = math.inf, low_open: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if math.isnan(v) or v > high or v < low or (low_open and v == low):
        lo = "(" if low_open else "["
        raise ValueError(f"{name} must be in {lo}{low}, {high}], got {v}")
    if not abs(v) <= FLOAT32_MAX:
        # inf, or a value such as 1e39 that becomes inf in float32: every score computed
        # from it would be NaN.
        raise ValueError(f"{name} must be finite in float32 (|{name}| <= {FLOAT32_MAX:.4g}), got {v}")
    return v


def _integer(name: str, value, *, low: int, high: Optional[int] = INT32_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, (int,)) and not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if v < low or (high is not None and v > high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {v}")
    return v


@dataclass(frozen=True)
class Config:
    """Options of a batched search.

    ``algorithm="puct"`` is mctx's ``muzero_policy``: score(a) = Qn(a) + sqrt(N) *
    (c1 + log((N + c2 + 1) / c2)) * P(a) / (1 + n(a)), with N the node's visits, Qn the
    Q-values min-max normalised over the node's value and its visited children (unvisited
    children get 0), and Dirichlet(``dirichlet_alpha``) noise mixed into the root prior
    with weight ``dirichlet_fraction``. The played action is drawn from visits^(1/T),
    ``temperature`` T (0: the most visited action).

    ``algorithm="gumbel"`` is mctx's ``gumbel_muzero_policy``: at the root, Gumbel-top-k
    over ``max_considered_actions`` actions (noise scaled by ``gumbel_scale``; 0 makes the
    search deterministic) and sequential halving; inside the tree, the deterministic
    argmax(softmax(logits + sigma(completedQ)) - n / (1 + sum n)). Unvisited actions are
    completed by the mixed value (``use_mixed_value``) and sigma(q) = (``maxvisit_init`` +
    max n) * ``value_scale`` * q, with q min-max rescaled first when ``rescale_values``.
    The played action is the sequential-halving winner (``temperature`` is not used) and
    the training target is softmax(logits + sigma(completedQ)).

    ``max_depth`` (edges from the root; None: unlimited) ends a simulation at an existing
    node at that depth, which is then revisited instead of expanded. ``seed`` keys the
    counter-based generator (results do not depend on the thread count);
    ``num_threads=0`` uses every thread of ``rlkern.set_num_threads``.
    """

    algorithm: str = "puct"
    c1: float = 1.25
    c2: float = 19652.0
    dirichlet_alpha: float = 0.3
    dirichlet_fraction: float = 0.25
    max_considered_actions: int = 16
    gumbel_scale: float = 1.0
    maxvisit_init: float = 50.0
    value_scale: float = 0.1
    rescale_values: bool = True
    use_mixed_value: bool = True
    temperature: float = 1.0
    max_depth: Optional[int] = None
    seed: int = 0
    num_threads: int = 0

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        _number("c1", self.c1, low=0.0)
        _number("c2", self.c2, low=0.0, low_open=True)
        _number("dirichlet_alpha", self.dirichlet_alpha, low=0.0, low_open=True)
        _number("dirichlet_fraction", self.dirichlet_fraction, low=0.0, high=1.0)
        _integer("max_considered_actions", self.max_considered_actions, low=1)
        _number("gumbel_scale", self.gumbel_scale, low=0.0)
        _number("maxvisit_init", self.maxvisit_init, low=0.0)
        _number("value_scale", self.value_scale, low=0.0)
        if not (float(self.maxvisit_init) + INT32_MAX) * float(self.value_scale) <= FLOAT32_MAX:
            raise ValueError("maxvisit_init and value_scale: sigma's scale (maxvisit_init + max visits) * value_scale "
                             f"must stay finite in float32, got maxvisit_init={self.maxvisit_init}, "
                             f"value_scale={self.value_scale}")
        _number("temperature", self.temperature, low=0.0)
        if self.max_depth is not None:
            _integer("max_depth", self.max_depth, low=1)
        _integer("seed", self.seed, low=0, high=None)  # any size: the core uses its low 64 bits
        _integer("num_threads", self.num_threads, low=0)
        for name in ("rescale_values", "use_mixed_value"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
