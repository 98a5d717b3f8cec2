"""``benchmarks/gpu/run.sh --smoke``: the GPU check end to end on CPU (miniature shapes), as a GPU run would go."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from shortv.benchmark import BenchResult

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke(tmp_path: Path) -> None:
    command = ["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh"), str(tmp_path), "--smoke"]
    done = subprocess.run(command, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "cells.jsonl", "env.txt", "log.txt", "parity.txt", "parity.xml", "report.md", "results.json"]

    results = json.loads((tmp_path / "results.json").read_text())
    assert (results["format"], results["version"]) == ("shortv-gpu-check", 1)
    assert "1 passed" in results["parity"]
    cells = results["cells"]
    setup = cells[0]
    assert setup["kind"] == "setup" and setup["device"] == "cpu" and setup["smoke"]
    shapes = setup["shapes"]
    assert {"llava-1.5-7b", "next-7b", "qwen2-vl-7b"} <= set(shapes)
    kinds = Counter(cell["kind"] for cell in cells)
    assert kinds["error"] == 0, [cell for cell in cells if cell["kind"] == "error"]
    assert kinds["generate"] == kinds["prefill"] == 2 * len(shapes) and kinds["done"] == 1
    rates = next(cell for cell in cells if cell["kind"] == "rates")
    assert rates["flops_per_s"] > 0 and rates["bytes_per_s"] > 0

    for cell in cells:
        if cell["kind"] == "prefill":
            timing = cell["timing"]
            assert len(timing["baseline_s"]["values"]) == len(timing["shortv_s"]["values"]) == 2
            assert timing["speedup"] == pytest.approx(timing["baseline_s"]["median"] / timing["shortv_s"]["median"])
            assert 1 < cell["roofline_ideal"] <= cell["flops_ideal"]
            assert cell["realized_of_roofline"] == pytest.approx(timing["speedup"] / cell["roofline_ideal"])
            assert len(cell["text_tokens"]) == cell["batch"] and cell["shortv_layers"]
        if cell["kind"] == "generate":
            result = BenchResult.from_dict(cell["result"])  # the recorded BenchResult format
            assert result.batch_size == cell["batch"] and result.baseline.decode_tokens_per_s is not None

    report = (tmp_path / "report.md").read_text()
    assert "--smoke" in report and "1 passed" in report
    assert sum(line.startswith(f"| {shape} |") for shape in shapes for line in report.splitlines()) == 4 * len(shapes)
