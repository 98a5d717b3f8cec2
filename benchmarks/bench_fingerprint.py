"""Cost of the weights fingerprint (`shortv.fingerprint.fingerprint_folder`) on a 7B-sized checkpoint.

Builds, in a temporary folder, the tensor layout of LLaVA-1.5-7B (CLIP ViT-L/336 tower, projector, 32-layer
7B Llama: 686 tensors, real shapes, bf16: 14 GB of data) as three safetensors shards and their index, as the hub
checkpoint is stored; fingerprints it with the files in the page cache (warm) and after evicting them from it
(cold, ``posix_fadvise(DONTNEED)``: every sampled window is read from the disk); prints the times and the
fingerprint; deletes the files. The tensor bytes are a repeated random block (what they hold does not change the
cost); prints the size of the recorded fingerprint, full (run files) and compact (configs, LC files). Run:

    python benchmarks/bench_fingerprint.py [--scale 1.0] [--repeats 5] [--dir /tmp]

``--scale 0.25`` divides the hidden sizes by 4 (1 GB, same tensor count) on a machine with little disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from shortv.fingerprint import fingerprint_folder

BLOCK = os.urandom(1 << 24)  # 16 MiB written over and over


def llava_7b_layout(scale: float) -> list[tuple[str, list[int]]]:
    """(name, shape) of every tensor of LLaVA-1.5-7B, in the hub checkpoint's naming; dims times ``scale``."""
    def d(value: int) -> int:
        return max(1, int(value * scale))

    hidden, inter, vocab, vision, vision_inter = d(4096), d(11008), 32064, d(1024), d(4096)
    tensors: list[tuple[str, list[int]]] = [("model.language_model.embed_tokens.weight", [vocab, hidden])]
    for layer in range(32):
        prefix = f"model.language_model.layers.{layer}"
        tensors += [(f"{prefix}.self_attn.{p}_proj.weight", [hidden, hidden]) for p in "qkvo"]
        tensors += [(f"{prefix}.mlp.gate_proj.weight", [inter, hidden]),
                    (f"{prefix}.mlp.up_proj.weight", [inter, hidden]),
                    (f"{prefix}.mlp.down_proj.weight", [hidden, inter]),
                    (f"{prefix}.input_layernorm.weight", [hidden]),
                    (f"{prefix}.post_attention_layernorm.weight", [hidden])]
    tensors += [("model.language_model.norm.weight", [hidden]), ("lm_head.weight", [vocab, hidden])]
    tower = "model.vision_tower.vision_model"
    tensors += [(f"{tower}.embeddings.class_embedding", [vision]),
                (f"{tower}.embeddings.patch_embedding.weight", [vision, 3, 14, 14]),
                (f"{tower}.embeddings.position_embedding.weight", [577, vision]),
                (f"{tower}.pre_layrnorm.weight", [vision]), (f"{tower}.pre_layrnorm.bias", [vision])]
    for layer in range(24):
        prefix = f"{tower}.encoder.layers.{layer}"
        for p in ("q", "k", "v", "out"):
            tensors += [(f"{prefix}.self_attn.{p}_proj.weight", [vision, vision]),
                        (f"{prefix}.self_attn.{p}_proj.bias", [vision])]
        for norm in ("layer_norm1", "layer_norm2"):
            tensors += [(f"{prefix}.{norm}.weight", [vision]), (f"{prefix}.{norm}.bias", [vision])]
        tensors += [(f"{prefix}.mlp.fc1.weight", [vision_inter, vision]), (f"{prefix}.mlp.fc1.bias", [vision_inter]),
                    (f"{prefix}.mlp.fc2.weight", [vision, vision_inter]), (f"{prefix}.mlp.fc2.bias", [vision])]
    tensors += [(f"{tower}.post_layernorm.weight", [vision]), (f"{tower}.post_layernorm.bias", [vision]),
                ("model.multi_modal_projector.linear_1.weight", [hidden, vision]),
                ("model.multi_modal_projector.linear_1.bias", [hidden]),
                ("model.multi_modal_projector.linear_2.weight", [hidden, hidden]),
                ("model.multi_modal_projector.linear_2.bias", [hidden])]
    return tensors


def numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def write_shard(path: Path, tensors: list[tuple[str, list[int]]]) -> int:
    """One safetensors file (the format: 8-byte header length, JSON header, data) of bf16 tensors."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        size = 2 * numel(shape)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as handle:
        handle.write(len(raw).to_bytes(8, "little") + raw)
        left = offset
        while left:
            chunk = BLOCK[: min(left, len(BLOCK))]
            handle.write(chunk)
            left -= len(chunk)
        handle.flush()
        os.fsync(handle.fileno())
    return offset


def build(folder: Path, scale: float, shards: int = 3) -> int:
    layout = llava_7b_layout(scale)
    total = sum(2 * numel(shape) for _, shape in layout)
    parts: list[list[tuple[str, list[int]]]] = [[] for _ in range(shards)]
    filled = 0
    for name, shape in layout:  # contiguous runs of tensors of about equal bytes, as save_pretrained shards
        parts[min(shards - 1, filled * shards // total)].append((name, shape))
        filled += 2 * numel(shape)
    weight_map = {}
    for index, part in enumerate(parts, start=1):
        name = f"model-{index:05d}-of-{shards:05d}.safetensors"
        write_shard(folder / name, part)
        weight_map.update({tensor: name for tensor, _ in part})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def evict(folder: Path) -> None:
    """Drop the files from the page cache, so that the next read goes to the disk."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(folder: Path, cold: bool) -> tuple[float, object]:
    if cold:
        evict(folder)
    began = time.perf_counter()
    fingerprint = fingerprint_folder(folder)
    return time.perf_counter() - began, fingerprint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="shortv_fingerprint_", dir=args.dir))
    try:
        began = time.perf_counter()
        total = build(folder, args.scale)
        print(f"built {folder}: {len(list(folder.glob('*.safetensors')))} shards, "
              f"{len(llava_7b_layout(args.scale))} tensors, {total / 1e9:.2f} GB "
              f"in {time.perf_counter() - began:.1f} s")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.2f} (1 min) before timing")
        for cold in (True, False):
            timed(folder, cold)  # first call: imports, and for warm, fills the cache
            times = []
            for _ in range(args.repeats):
                seconds, fingerprint = timed(folder, cold)
                times.append(seconds)
            print(f"{'cold (evicted from page cache)' if cold else 'warm (in page cache)'}: median "
                  f"{1e3 * statistics.median(times):.1f} ms, min {1e3 * min(times):.1f} ms, max "
                  f"{1e3 * max(times):.1f} ms over {args.repeats} runs")
        print(f"fingerprint: {fingerprint.label()}, digest {fingerprint.digest}")
        full, compact = fingerprint.to_dict(), fingerprint.compact().to_dict()
        print(f"recorded size, full (run files): {len(json.dumps(full)) / 1e3:.1f} kB of JSON, "
              f"{len(json.dumps(full, indent=1)) / 1e3:.1f} kB indented as in lc_run.json")
        print(f"recorded size, compact (shortv_config.json, lc.json): {len(json.dumps(compact))} bytes of JSON, "
              f"{len(json.dumps(compact, indent=2))} bytes indented as in shortv_config.json")
        print(f"load average {os.getloadavg()[0]:.2f} (1 min) after timing")
    finally:
        shutil.rmtree(folder)
        print(f"deleted {folder}")


if __name__ == "__main__":
    main()
