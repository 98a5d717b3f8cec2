"""Efficient vs naive Layer Contribution on the same samples: layer evaluations, wall time, equal results.

    python benchmarks/bench_lc.py [--num-samples 8] [--untrained]

Uses the embedded tiny LLaVA (12 decoder layers, 36 visual tokens per image) and its calib split; --untrained
builds the same architecture with random weights. The naive oracle is the test suite's (tests/lc_oracle.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from lc_oracle import naive_sample_contribution  # noqa: E402

from shortv.contribution import sample_contribution  # noqa: E402
from shortv.data import CalibrationSamples, read_jsonl, subsample  # noqa: E402


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--untrained", action="store_true", help="random weights instead of the shipped checkpoint")
    parser.add_argument("--max-variants-per-batch", type=int, default=16,
                        help="variants replayed together (1: same batch shapes as the naive method)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lc_efficiency.json")
    args = parser.parse_args()

    from shortv.tiny import build, embedded_split_path

    if args.untrained:
        torch.manual_seed(0)
        model, processor = build.build_model(seed=0).eval(), build.build_processor()
    else:
        from shortv.tiny import load_embedded

        model, processor = load_embedded()
    samples = CalibrationSamples(processor, subsample(read_jsonl(embedded_split_path("calib")), args.num_samples, 0))
    built = [samples[index] for index in range(len(samples))]
    visual_id = processor.image_token_id

    totals = {"efficient": [0, 0.0], "naive": [0, 0.0]}
    worst, worst_absolute = 0.0, 0.0
    for sample in built:
        began = time.perf_counter()
        efficient, evaluations = sample_contribution(model, sample, max_variants_per_batch=args.max_variants_per_batch)
        totals["efficient"][0] += evaluations
        totals["efficient"][1] += time.perf_counter() - began
        began = time.perf_counter()
        naive, evaluations = naive_sample_contribution(model, sample, sample.inputs["input_ids"] == visual_id)
        totals["naive"][0] += evaluations
        totals["naive"][1] += time.perf_counter() - began
        for token_type in ("visual", "text"):
            for a, b in zip(efficient[token_type], naive[token_type]):
                worst_absolute = max(worst_absolute, abs(a - b))
                if b != 0:
                    worst = max(worst, abs(a - b) / abs(b))

    layers = model.config.text_config.num_hidden_layers
    tokens = built[0].inputs["input_ids"].shape[1]
    result = {
        "model": "embedded tiny LLaVA" + (" (untrained)" if args.untrained else ""),
        "decoder_layers": layers,
        "tokens_per_sample": tokens,
        "num_samples": len(built),
        "max_variants_per_batch": args.max_variants_per_batch,
        "layer_evaluations": {key: value[0] for key, value in totals.items()},
        "seconds": {key: round(value[1], 3) for key, value in totals.items()},
        "speedup": round(totals["naive"][1] / totals["efficient"][1], 2),
        "evaluation_ratio": round(totals["naive"][0] / totals["efficient"][0], 2),
        "max_relative_difference": worst,
        "max_absolute_difference": worst_absolute,
        "machine": f"{cpu_name()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "date": date.today().isoformat(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['model']}: {layers} layers, {tokens} tokens/sample, {len(built)} samples")
    for key in ("efficient", "naive"):
        print(f"  {key:9s}: {totals[key][0]:6d} layer evaluations  {totals[key][1]:7.2f} s")
    print(f"  speedup {result['speedup']}x wall time, {result['evaluation_ratio']}x fewer layer evaluations; "
          f"max difference {worst:.2e} relative, {worst_absolute:.2e} absolute")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
