"""The MCTS forest compiled twice on x86-64 (rlkern/mcts.h): the AVX2 build must give the
baseline build's searches bit for bit, and the wrapper must take it only where it may."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from rlkern import mcts
from rlkern._ext import load
from rlkern.mcts import forest as forest_module

from helpers import run_isolated

core = load().mcts
needs_both = pytest.mark.skipif(not (hasattr(core, "ForestAVX2") and core.cpu_has_avx2()),
                                reason="no AVX2 forest in this build or no AVX2 on this CPU")


def _search_dump(cls, monkeypatch, *, algorithm, B, A, S, legal, terminal, threads, moves, seed):
    """Every root result and the whole exported tree after `moves` searches with tree reuse,
    run on the core class `cls`."""
    monkeypatch.setattr(forest_module, "_core_class", lambda: cls)
    rng = np.random.default_rng(seed)
    T = 61
    logits = (rng.normal(size=(T, A)) * 2).astype(np.float32)
    values = rng.uniform(-1, 1, T).astype(np.float32)
    rewards = rng.uniform(-0.5, 0.5, T).astype(np.float32)
    masks = rng.uniform(size=(T, A)) < 0.7
    masks[:, 0] = True
    # -inf logits (impossible actions left unmasked), a row of them (uniform priors) and
    # a row of ties (the first largest prior decides the best unexpanded edge).
    logits[rng.uniform(size=(T, A)) < 0.15] = -np.inf
    logits[3] = -np.inf
    logits[4] = 1.5
    terminals = rng.uniform(size=T) < 0.1
    cfg = mcts.Config(algorithm=algorithm, num_threads=threads, seed=seed, max_considered_actions=8)
    f = mcts.Forest(B, A, moves * S + 2, cfg)
    assert isinstance(f._core, cls)

    def recurrent_fn(leaves):
        row = (leaves.node * 5 + leaves.parent * 3 + leaves.action) % T
        return mcts.Expansion(logits[row], values[row], rewards[row], np.where(row % 4 == 0, 1.0, -1.0),
                              masks[row] if legal else None, terminals[row] if terminal else None)

    root_logits = (logits[0] + rng.normal(size=(B, A))).astype(np.float32)
    root_values = rng.uniform(-1, 1, B).astype(np.float32)
    root_masks = masks[rng.integers(0, T, B)] if legal else None
    f.set_roots(root_logits, root_values, root_masks)
    out = []
    for _ in range(moves):
        r = f.search(recurrent_fn, S)
        out += [np.asarray(getattr(r, field.name)) for field in dataclasses.fields(r)]
        out += [np.asarray(v) for _, v in sorted(f.export().items())]
        out.append(f.advance(r.action))
        # A tree whose chosen child was never expanded (or is terminal) comes back empty:
        # start it again so that the next search covers fresh roots beside reused ones.
        emptied = ~f.has_root()
        if emptied.any():
            f.set_roots(root_logits, root_values, root_masks, rows=emptied)
        out.append(emptied)
    return out


@needs_both
@pytest.mark.parametrize("algorithm", ["puct", "gumbel"])
# 8 to 16 actions without a mask take the AVX2 build's own softmax (forest.cpp,
# softmax_8_to_16); the other sizes and masked rows take the code both builds share.
@pytest.mark.parametrize("A,legal,terminal", [(3, False, False), (8, False, False), (9, False, False),
                                              (9, True, True), (13, False, True), (16, False, False),
                                              (40, True, False), (362, False, True)])
@pytest.mark.parametrize("threads", [1, 2])
def test_avx2_forest_searches_as_the_baseline_forest_bit_for_bit(monkeypatch, algorithm, A, legal, terminal, threads):
    kw = dict(algorithm=algorithm, B=24 if A < 100 else 6, A=A, S=30, legal=legal, terminal=terminal,
              threads=threads, moves=2, seed=A * 7 + threads)
    base = _search_dump(core.Forest, monkeypatch, **kw)
    avx2 = _search_dump(core.ForestAVX2, monkeypatch, **kw)
    assert len(base) == len(avx2)
    for i, (x, y) in enumerate(zip(base, avx2)):
        assert x.dtype == y.dtype and x.shape == y.shape, i
        # Bit patterns, so that NaN, -0 and every rounding compare exactly.
        assert np.array_equal(np.ascontiguousarray(x).view(np.uint8), np.ascontiguousarray(y).view(np.uint8)), i


@needs_both
def test_wrapper_takes_the_avx2_forest_unless_disabled():
    assert isinstance(mcts.Forest(2, 3, 4)._core, core.ForestAVX2)
    proc = run_isolated("""
        from rlkern import mcts
        from rlkern._ext import load
        f = mcts.Forest(2, 3, 4)
        assert type(f._core) is load().mcts.Forest, type(f._core)
        print("baseline")
    """, env={"RLKERN_DISABLE_AVX2": "1"})
    assert "baseline" in proc.stdout


def test_wrapper_takes_the_baseline_forest_without_avx2():
    if hasattr(core, "ForestAVX2") and core.cpu_has_avx2():
        pytest.skip("this CPU runs the AVX2 forest (the other test covers it)")
    assert type(mcts.Forest(2, 3, 4)._core) is core.Forest
