"""Roofline and FLOPs-ideal prefill speedups (`shortv.benchmark.ideal`): hand-computed cases and paper shapes."""

from __future__ import annotations

import pytest

from shortv.benchmark import DeviceRates, ideal_prefill_speedup, roofline_prefill_seconds, roofline_prefill_speedup
from shortv.config import ShortVConfig
from shortv.flops import LayerDims, get_shape

# hidden 4, MLP 8, 2 query heads / 1 KV head of width 2: q/o 16 weights, k/v 8, gate/up/down 32 each.
SMALL = LayerDims(hidden_size=4, intermediate_size=8, num_attention_heads=2, num_key_value_heads=1, head_dim=2,
                  num_layers=2, vocab_size=10)
# 1 FLOP/s and 0.5 byte/s with 2-byte weights: a product costs max(2 * rows * weights, 4 * weights) seconds.
SLOW = DeviceRates(flops_per_s=1, bytes_per_s=0.5)


def test_roofline_by_hand() -> None:
    # Sample of 1 text + 3 visual tokens. Dense layer: every product has 4 rows, compute-bound:
    # 8 * 144 weights = 1152 s, attention 4 * 4 * 4 * 2 * 2 = 256 s.  ShortV layer: k/v over 4 rows, compute-bound
    # (8 * 16 = 128 s); q/o/MLP over 1 row, bound by their weights (4 * 128 = 512 s); attention 4 * 1 * 4 * 4 = 64 s.
    # LM head, one position: max(2 * 40, 4 * 40) = 160 s.
    assert roofline_prefill_seconds(SMALL, [(1, 3)], [], SLOW) == 2 * 1408 + 160
    assert roofline_prefill_seconds(SMALL, [(1, 3)], [1], SLOW) == 1408 + 704 + 160
    assert roofline_prefill_speedup(SMALL, [(1, 3)], [1], SLOW) == pytest.approx(2976 / 2272)
    # A batch of two is one product per projection: rows add up, each weight is read once. Dense: 16 * 144 + 512;
    # ShortV: k/v 256, q/o/MLP 2 rows = exactly their weight time 512, attention 128; LM head 2 rows: 160.
    assert roofline_prefill_seconds(SMALL, [(1, 3), (1, 3)], [], SLOW) == 2 * 2816 + 160
    assert roofline_prefill_seconds(SMALL, [(1, 3), (1, 3)], [0], SLOW) == 2816 + 896 + 160
    with pytest.raises(ValueError, match="out of range"):
        roofline_prefill_seconds(SMALL, [(1, 3)], [2], SLOW)
    with pytest.raises(ValueError, match="positive"):
        DeviceRates(flops_per_s=0, bytes_per_s=1)


def _paper(name: str, batch: int = 1) -> tuple[LayerDims, list[tuple[int, int]], list[int]]:
    shape = get_shape(name)
    preset = {"llava-1.5-7b": "llava-1.5-7b", "next-7b": "llava-next-7b"}.get(name)
    layers = ShortVConfig.from_preset(preset, 19).layers if preset else list(range(9, 28))
    return shape.dims, [(64, shape.visual_tokens)] * batch, layers


@pytest.mark.parametrize("name", ["llava-1.5-7b", "next-7b", "qwen2-vl-7b", "qwen3-vl-8b", "gemma3-12b", "qwen3.6-27b"])
@pytest.mark.parametrize("batch", [1, 8])
def test_unlimited_bandwidth_gives_the_flops_ideal(name: str, batch: int) -> None:
    dims, counts, layers = _paper(name, batch)
    unlimited = DeviceRates(flops_per_s=7e14, bytes_per_s=1e30)
    assert roofline_prefill_speedup(dims, counts, layers, unlimited) == pytest.approx(
        ideal_prefill_speedup(dims, counts, layers), rel=1e-9
    )


def test_h100_roofline_at_the_paper_shapes() -> None:
    # H100 SXM: 3.35 TB/s; dense bf16 GEMMs measure 600-800 TFLOP/s (989 on the datasheet).
    measured, datasheet = DeviceRates(6.5e14, 3.35e12), DeviceRates(9.89e14, 3.35e12)
    llava, next_7b, qwen = _paper("llava-1.5-7b"), _paper("next-7b"), _paper("qwen2-vl-7b")
    assert ideal_prefill_speedup(*llava) == pytest.approx(1.81, abs=0.01)
    # LLaVA-1.5-7B at N=19, batch 1: the 64-row q/o/MLP products are bound by their weights; ~1.6x (issue #14).
    assert 1.50 < roofline_prefill_speedup(*llava, measured) < 1.60
    # The faster the arithmetic, the more the weight reads weigh: the datasheet rate allows less.
    assert roofline_prefill_speedup(*llava, datasheet) == pytest.approx(1.37, abs=0.01)
    # LLaVA-NeXT-7B: 2880 visual tokens keep the all-token K/V products dominant, close to its 1.98x FLOPs-ideal.
    assert ideal_prefill_speedup(*next_7b) == pytest.approx(1.98, abs=0.01)
    assert 1.88 < roofline_prefill_speedup(*next_7b, measured) < 1.92
    # Qwen2-VL's grouped-query K/V are cheap, so a ShortV layer is nearly all weight-bound products: 2.51x -> ~1.8x.
    assert ideal_prefill_speedup(*qwen) == pytest.approx(2.51, abs=0.01)
    assert 1.80 < roofline_prefill_speedup(*qwen, measured) < 1.90
    # Batch 8: 512 text rows make those products compute-bound again, within 1% of the FLOPs-ideal.
    for name in ("llava-1.5-7b", "next-7b", "qwen2-vl-7b"):
        dims, counts, layers = _paper(name, batch=8)
        assert roofline_prefill_speedup(dims, counts, layers, measured) == pytest.approx(
            ideal_prefill_speedup(dims, counts, layers), rel=0.01
        )


def test_roofline_never_exceeds_the_flops_ideal() -> None:
    # A ShortV product has at most the dense one's rows and the same weight, so a weight-bound floor adds at least as
    # much time to ShortV as to the dense model: the roofline speedup lies between 1 and the FLOPs-ideal.
    import random

    generator = random.Random(0)
    for _ in range(200):
        heads = generator.choice([4, 8, 32])
        dims = LayerDims(hidden_size=heads * 16, intermediate_size=generator.randint(16, 2048),
                         num_attention_heads=heads, num_key_value_heads=generator.choice([1, heads]), head_dim=16,
                         num_layers=8, vocab_size=generator.randint(10, 5000), qk_norm=generator.random() < 0.5)
        counts = [(generator.randint(0, 300), generator.randint(0, 3000)) for _ in range(generator.randint(1, 4))]
        counts = [(t, v) if t + v else (1, 0) for t, v in counts]
        layers = generator.sample(range(8), generator.randint(0, 8))
        rates = DeviceRates(flops_per_s=10 ** generator.uniform(9, 15), bytes_per_s=10 ** generator.uniform(9, 13))
        roofline = roofline_prefill_speedup(dims, counts, layers, rates)
        assert 1 - 1e-12 <= roofline <= ideal_prefill_speedup(dims, counts, layers) * (1 + 1e-12)
