"""The GPU bench's pieces: the bytes-moved model, the copy-bandwidth measurement, the GPU-only
suite and the gpu_check summary. Most run on the CPU; the ones marked ``gpu`` need CUDA."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest
import torch

from rlkern.bench import bandwidth, gpu, logprobs, losses, mcts_gpu, returns
from rlkern.bench.core import Case, Result
from rlkern.cli import main

from helpers import needs_cuda

ROOT = pathlib.Path(__file__).resolve().parent.parent
CUDA = torch.device("cuda")


def _gpu_cases(quick: bool):
    # Building the Case objects allocates nothing (make is lazy), so this runs anywhere.
    return (returns.cases(CUDA, quick) + losses.cases(CUDA, quick) + logprobs.cases(CUDA, quick)
            + gpu.cases(CUDA, quick))


@pytest.mark.parametrize("quick", [False, True])
def test_every_gpu_kernel_case_has_a_bytes_model(quick):
    cases = _gpu_cases(quick)
    kernel_cases = [c for c in cases if "search" not in c.op]  # MCTS: a CPU tree, no memory-bound kernel
    assert len(kernel_cases) >= 10
    missing = [(c.suite, c.op, c.shape) for c in kernel_cases if bandwidth.model_for(c) is None]
    assert not missing, f"benchmark cases without a bytes-moved model: {missing}"
    assert all(bandwidth.model_for(c).bytes > 0 for c in kernel_cases)


def test_bytes_model_values():
    n = 4096 * 2048
    # The scans' model matches the returns suite's memory floor (9n read, 8n written for GAE).
    assert bandwidth.scan_bytes("gae", 4096, 2048) == n * 17
    assert bandwidth.scan_bytes("discounted_returns", 4096, 2048) == n * 9
    assert bandwidth.scan_bytes("lambda_returns", 4096, 2048) == n * 13
    assert bandwidth.scan_bytes("masked_gae", 4096, 2048, itemsize=2) == n * (2 * 2 + 1 + 8)
    assert bandwidth.scan_bytes("gae", 2, 3, itemsize=8) == 6 * (16 + 1 + 16)
    # Log-probs: the logits read once and their gradient written once dominate.
    N, V = 4096, 151936
    assert bandwidth.token_logprobs_bytes(N, V, 2) == 2 * N * V * 2 + N * (8 + 8)
    assert bandwidth.token_logprobs_bytes(N, V, 4, backward=False, entropy=False) == N * V * 4 + N * 12
    # GRPO in bf16: logp, old, ref read, the mask read, the gradient written, advantages.
    assert bandwidth.policy_loss_bytes(256, 4096, 2, ref=True) == 256 * 4096 * (3 * 2 + 1 + 2) + 256 * 4
    m = bandwidth.linear_logprobs_model(2048, 1024, 65536, 2)
    assert m.flops == 6 * 2048 * 1024 * 65536 and m.bytes > 2 * 65536 * 1024 * 2


def test_model_parses_the_suites_names():
    c = Case("losses", "policy_loss grpo fwd+bwd bfloat16", "256x4096", lambda d: {})
    assert bandwidth.model_for(c).bytes == bandwidth.policy_loss_bytes(256, 4096, 2, ref=True)
    c = Case("losses", "policy_loss gspo fwd+bwd float32", "64x1024", lambda d: {})
    assert bandwidth.model_for(c).bytes == bandwidth.policy_loss_bytes(64, 1024, 4, ref=False)
    c = Case("logprobs", "token_logprobs+entropy fwd+bwd", "4096x151936 bf16", lambda d: {})
    assert bandwidth.model_for(c).bytes == bandwidth.token_logprobs_bytes(4096, 151936, 2)
    c = Case("gpu", "token_logprobs cross-entropy fwd+bwd bf16", "N=4096 V=151936 bf16", lambda d: {})
    assert bandwidth.model_for(c).bytes == bandwidth.token_logprobs_bytes(4096, 151936, 2, entropy=False)
    c = Case("returns", "gae", "1024x1024 f32", lambda d: {})
    assert bandwidth.model_for(c).bytes == bandwidth.scan_bytes("gae", 1024, 1024)
    assert bandwidth.model_for(Case("mcts", "puct_search", "B=1 A=2 S=3", lambda d: {})) is None


def test_annotate_fills_bandwidth_and_fraction_and_skips_failures():
    case = Case("returns", "gae", "1000x1000 f32", lambda d: {})
    ok = Result("returns", "gae", "1000x1000 f32", "rlkern", 2.0)
    bad = Result("returns", "gae", "1000x1000 f32", "other", float("nan"), error="RuntimeError: x")
    bandwidth.annotate(case, [ok, bad], copy_gbps=34.0)
    expected = 17e6 / 2e-3 / 1e9
    assert math.isclose(ok.roofline["gbps"], expected)
    assert math.isclose(ok.roofline["copy_fraction"], expected / 34.0)
    assert ok.roofline["tflops"] is None
    assert bad.roofline is None
    lin = Case("logprobs", "linear_token_logprobs+entropy fwd+bwd", "2048x1024->65536 bf16", lambda d: {})
    r = Result("logprobs", lin.op, lin.shape, "rlkern", 10.0)
    bandwidth.annotate(lin, [r], None)
    assert math.isclose(r.roofline["tflops"], 6 * 2048 * 1024 * 65536 / 1e-2 / 1e12)
    assert r.roofline["copy_fraction"] is None


def test_copy_bandwidth_on_cpu_is_positive_and_finite():
    gbps = bandwidth.copy_bandwidth(torch.device("cpu"), nbytes=8 << 20, repeats=4)
    assert math.isfinite(gbps) and gbps > 0.05


def test_gpu_suite_is_empty_without_cuda_and_not_in_the_cpu_default():
    assert gpu.cases(torch.device("cpu"), False) == []
    assert mcts_gpu.cases(torch.device("cpu"), False) == []
    from rlkern.bench.runner import GPU_SUITES, SUITES

    assert "gpu" in GPU_SUITES and "gpu" not in SUITES


def test_gpu_suite_shapes_follow_the_issue():
    shapes = {c.shape for c in mcts_gpu.cases(CUDA, False)}
    assert shapes == {"B=256 A=9 S=50", "B=1024 A=9 S=50", "B=256 A=362 S=50"}
    ops = {c.op for c in gpu.cases(CUDA, False)}
    assert {"linear_grpo fwd+bwd bf16", "token_logprobs cross-entropy fwd+bwd bf16",
            "linear_token_logprobs cross-entropy fwd+bwd bf16"} <= ops


def test_bench_json_has_copy_bandwidth_and_rooflines(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--only", "returns", "--filter", "discounted", "--quick", "--budget", "0.02",
                 "--no-memory", "--json", str(out), "--device", "cpu"]) == 0
    data = json.loads(out.read_text())
    assert data["copy_gbps"] > 0 and data["skipped"] == []
    ours = [r for r in data["results"] if r["impl"] == "rlkern"]
    assert ours and all(r["roofline"]["gbps"] > 0 and r["roofline"]["copy_fraction"] > 0 for r in ours)


def test_bench_time_limit_skips_the_cases_that_do_not_fit(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--only", "returns", "--quick", "--budget", "0.02", "--no-memory", "--time-limit", "0",
                 "--json", str(out), "--device", "cpu"]) == 0
    data = json.loads(out.read_text())
    assert data["results"] == []
    assert data["skipped"] == ["returns/gae 64x128 f32", "returns/discounted_returns 64x128 f32",
                               "returns/lambda_returns 64x128 f32", "returns/masked_gae 64x128 f32"]
    assert "time limit: skipped 4 cases" in capsys.readouterr().err


def test_summary_reports_parts_failures_and_kernels(tmp_path):
    (tmp_path / "parts.tsv").write_text("part\tstatus\tseconds\tnote\nbuild\tok\t80\tsm_90\n"
                                        "tests\tfailed\t100\tpytest exited 1\nmemcheck\tunavailable\t3\tgVisor\n")
    (tmp_path / "junit.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="3">'
        '<testcase classname="tests.test_gpu_kernels" name="test_a" time="1.5"/>'
        '<testcase classname="tests.test_gpu_kernels" name="test_b" time="2.0">'
        '<failure message="AssertionError: grad: max abs diff 1e-2">trace</failure></testcase>'
        '<testcase classname="tests.test_gpu_kernels" name="test_c" time="0"><skipped message="needs x"/></testcase>'
        '</testsuite></testsuites>')
    results = [dict(suite="gpu", op="token_logprobs cross-entropy fwd+bwd bf16", shape="N=4096 V=151936 bf16",
                    impl="rlkern", median_ms=1.25, speedup=1.0, error=None,
                    roofline=dict(bytes=5e9, gbps=4000.0, copy_fraction=0.93, flops=None, tflops=None)),
               dict(suite="gpu", op="token_logprobs cross-entropy fwd+bwd bf16", shape="N=4096 V=151936 bf16",
                    impl="F.cross_entropy", median_ms=5.0, speedup=4.0, error=None, roofline=None),
               dict(suite="gpu", op="token_logprobs cross-entropy fwd+bwd bf16", shape="N=4096 V=151936 bf16",
                    impl="liger CrossEntropy", median_ms=float("nan"), speedup=None,
                    error="RuntimeError: liger_kernel is not installed", roofline=None)]
    part = tmp_path / "bench-gpu.json"
    part.write_text(json.dumps({"device": "NVIDIA H200", "torch": "2.11.0", "copy_gbps": 4300.0,
                                "results": results, "skipped": ["gpu/puct_search gpu-network B=256 A=9 S=50"]}))
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_summary.py"), "--mode", "gpu", "--out",
                           str(tmp_path), "--bench", str(part)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "summary.md").read_text()
    assert text.startswith("# rlkern GPU check: FAIL")
    assert "1 passed, 1 failed, 0 errors, 1 skipped" in text
    assert "FAILED tests.test_gpu_kernels::test_b: AssertionError: grad" in text
    assert "| 1.250 | 4,000 | 93 |" in text and "F.cross_entropy 4.00x" in text
    assert "liger CrossEntropy: n/a (RuntimeError: liger_kernel is not installed)" in text
    assert "4,300 GB/s" in text
    assert "Not run (time limit), 1 cases: gpu/puct_search gpu-network B=256 A=9 S=50" in text
    merged = json.loads((tmp_path / "bench.json").read_text())
    assert len(merged["results"]) == 3 and merged["copy_gbps"] == 4300.0


def test_gpu_check_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "tools" / "gpu_check.sh")], check=True)


# ---- on a GPU ----------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda
def test_copy_bandwidth_on_the_gpu_is_plausible():
    gbps = bandwidth.copy_bandwidth(CUDA)
    # An H100/H200 copies at 2.5-4.5 TB/s (read + write); any current datacenter GPU at > 300 GB/s.
    assert 300 < gbps < 10_000, gbps


@pytest.mark.gpu
@needs_cuda
def test_gpu_suite_quick_runs(tmp_path):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--only", "gpu", "--quick", "--budget", "0.05", "--json", str(out), "--device", "cuda"])
    assert rc == 0
    results = json.loads(out.read_text())["results"]
    ours = [r for r in results if r["impl"] == "rlkern"]
    assert ours and all(r["error"] is None for r in ours)
    for r in results:
        if r["error"] is not None:
            # A competitor may be missing, and then its row names what to bring.
            assert "liger_kernel is not installed" in r["error"] or "mctx" in r["error"] or "JAX" in r["error"], r
