"""The benchmark suites run (small shapes) and report every implementation."""

import importlib.util
import json

import pytest

from rlkern.bench.runner import SUITES
from rlkern.cli import main


@pytest.mark.parametrize("suite", [s for s in SUITES if importlib.util.find_spec(f"rlkern.bench.{s}") is not None])
def test_quick_bench_runs(suite, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--only", suite, "--quick", "--budget", "0.05", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err[-3000:]
    results = json.loads(out.read_text())["results"]
    ours = [r for r in results if r["impl"] == "rlkern"]
    assert ours and all(r["error"] is None and r["median_ms"] > 0 for r in ours)
    assert any(r["impl"] != "rlkern" for r in results), "a benchmark without a competitor"
