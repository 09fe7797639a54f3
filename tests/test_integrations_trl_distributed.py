"""The high-entropy token selection (top_entropy_quantile) on 2 gloo processes against TRL's own.

TRL's GRPOTrainer.get_high_entropy_mask pads and gathers every active entropy of every process
through accelerate and takes torch.quantile of all of them; rlkern.integrations.trl's
high_entropy_mask gathers only each process's most extreme values. Both run here in the same
two processes (accelerate's state on a gloo group), on uneven token counts, ties across the
processes, a process without active tokens and NaN, and must select the same tokens.
"""

from __future__ import annotations

import os
import socket
import sys
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("trl", reason="the TRL integration test needs `trl` (pip install trl)")
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")

WORLD = 2
QUANTILES = (0.0, 0.2, 0.5, 0.8, 0.95, 1.0)


def _batch(rank, case):
    gen = torch.Generator().manual_seed(10 * case + rank)
    shape = [(3, 5), (4, 6)][rank]  # uneven micro-batches
    entropies = torch.rand(shape, generator=gen) * 3
    mask = (torch.rand(shape, generator=gen) > 0.3).long()
    if case == 1:  # heavy ties, the same values on both processes
        entropies = torch.round(entropies)
    if case == 2 and rank == 0:  # a process without active tokens
        mask.zero_()
    if case == 3:  # padding may hold anything, NaN included
        entropies[~mask.bool()] = float("nan")
    if case == 4 and rank == 1:  # an active NaN: TRL's quantile is NaN, nothing is selected
        entropies[mask.bool().nonzero()[0].tolist()] = float("nan")
    if case == 5:
        mask.zero_()
    return entropies, mask


def _worker(rank, port, failures):
    sys.path.insert(0, os.path.dirname(__file__))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    from accelerate import Accelerator
    from trl import GRPOTrainer

    import rlkern.integrations.trl as rlk_trl

    accelerator = Accelerator(cpu=True)
    try:
        assert accelerator.num_processes == WORLD and dist.get_backend() == "gloo"
        trl_like = types.SimpleNamespace(accelerator=accelerator)
        sent = []
        all_gather = dist.all_gather

        def recording_all_gather(outputs, tensor, *a, **kw):
            sent.append(tensor.numel())
            return all_gather(outputs, tensor, *a, **kw)

        for case in range(6):
            entropies, mask = _batch(rank, case)
            for q in QUANTILES:
                theirs = GRPOTrainer.get_high_entropy_mask(trl_like, entropies, mask, q)
                dist.all_gather = recording_all_gather
                try:
                    ours = rlk_trl.high_entropy_mask(entropies, mask, q)
                finally:
                    dist.all_gather = all_gather
                if not torch.equal(ours, theirs):
                    failures.append(f"rank {rank} case {case} quantile {q}: {ours.tolist()} vs TRL {theirs.tolist()}")
                if case == 0 and q in (0.8, 0.2):
                    # 2 counts, then the 4 (of 10 and 15) most extreme values: floor(0.2 * 25) + 3 = 8,
                    # at most all of a process's values
                    if sent[-2:] != [2, 8]:
                        failures.append(f"rank {rank} quantile {q}: gathered sizes {sent[-2:]}")
                if case == 1 and q == 0.5 and rank == 0 and not 0 < int(ours.sum()) < int(mask.sum()):
                    failures.append("the tie case selects all or nothing: it tests nothing")
    except Exception as exc:  # noqa: BLE001 - reported by the parent
        failures.append(f"rank {rank}: {type(exc).__name__}: {exc}")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_high_entropy_mask_on_two_processes_matches_trl():
    with mp.Manager() as manager:
        failures = manager.list()
        mp.spawn(_worker, args=(_free_port(), failures), nprocs=WORLD, join=True)
        assert list(failures) == []
