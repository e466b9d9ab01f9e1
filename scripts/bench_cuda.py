"""CUDA figures for docs/BENCHMARKS.md, run on the lent GPU machine (see that file).

    python scripts/bench_cuda.py [--device cuda] [--quick] > figures.json

sglang 0.5.10.post1 is the release under test (its wheel travels with the call);
the test-bed stand-ins replace sgl_kernel/flashinfer/aiter, which that machine lacks.

1. nsa-decode-cat-skip: the real ``NativeSparseAttnBackend.forward_decode`` with
   ROCm gfx95 flags emulated, original (split q, re-concatenated) vs patched (the
   fused q passed through), per decode layer at MLA decode shapes. The sparse
   attention entry point returns a preallocated output, so the difference
   between the two is exactly the work the patch removes (the concatenation and
   its allocation) plus the surrounding Python. Also the bare ``torch.cat`` at
   the same shapes timed with CUDA events, and per step of a 61-layer model.
2. nsa-indexer-fusion: the real ``Indexer._get_q_k_bf16`` / ``_get_k_bf16``
   original vs patched (``BENCH`` of its cases module).
"""

from __future__ import annotations

import argparse
import json
import sys

MODEL_LAYERS = 61  # DeepSeek-V3.2
KV_LORA_RANK, ROPE_DIM = 512, 64


def cat_cost_us(batch: int, heads: int, device: str, reps: int) -> float:
    """Median time of torch.cat of the two halves of a fused q (what HIP runs)."""
    import torch

    q = torch.randn(batch, heads, KV_LORA_RANK + ROPE_DIM, device=device, dtype=torch.bfloat16)
    nope, rope = q[..., :KV_LORA_RANK], q[..., KV_LORA_RANK:]
    for _ in range(10):
        torch.cat([nope, rope], dim=-1)
    if device.startswith("cuda"):
        samples = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                torch.cat([nope, rope], dim=-1)
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) * 1e3 / 20)
    else:
        import time

        samples = []
        for _ in range(reps):
            t = time.perf_counter()
            for _ in range(20):
                torch.cat([nope, rope], dim=-1)
            samples.append((time.perf_counter() - t) * 1e6 / 20)
    samples.sort()
    return samples[len(samples) // 2]


def decode_cat_skip(device: str, quick: bool) -> list:
    import torch

    from sgl_accel._bench import interleaved, op_profile
    from sgl_accel.cases import nsa_decode_cat_skip as cases
    from sgl_accel.testing.kernels import rocm

    outputs = {}

    def preallocated(q, kv, indices, sm_scale, d_v=512):
        key = (tuple(q.shape[:-1]), d_v, q.dtype, q.device)
        if key not in outputs:
            outputs[key] = torch.empty(*q.shape[:-1], d_v, dtype=q.dtype, device=q.device)
        return outputs[key]

    rocm.sparse_mla_reference = preallocated  # attention itself is not what the patch changes
    grid = [(1, 16), (32, 64), (256, 128)] if quick else [(1, 16), (1, 128), (8, 64), (32, 16), (32, 64), (32, 128), (64, 128), (128, 128), (256, 16), (256, 64), (256, 128)]
    rows = []
    for batch, heads in grid:
        original, patched = cases.decode_pair(batch, heads, device=device, impl="tilelang", topk=256, max_context=1024)
        timing = interleaved(original, patched, device, rounds=8 if quick else 30, inner=10 if quick else 50)
        ops_o, ops_p = op_profile(original), op_profile(patched)
        cat_us = cat_cost_us(batch, heads, device, reps=10 if quick else 50)
        saved_layer = timing["original_us"] - timing["patched_us"]
        rows.append(
            {
                "batch": batch,
                "heads": heads,
                "q_bytes": batch * heads * (KV_LORA_RANK + ROPE_DIM) * 2,
                "forward_decode_original_us": timing["original_us"],
                "forward_decode_patched_us": timing["patched_us"],
                "ratio_median": timing["ratio_median"],
                "saved_per_layer_us": saved_layer,
                "saved_per_step_61_layers_us": saved_layer * MODEL_LAYERS,
                "bare_cat_us": cat_us,
                "bare_cat_per_step_61_layers_us": cat_us * MODEL_LAYERS,
                "aten_cat": [ops_o["ops"].get("aten.cat.default", 0), ops_p["ops"].get("aten.cat.default", 0)],
                "allocations": [ops_o["allocations"], ops_p["allocations"]],
                "bytes_written": [ops_o["bytes_written"], ops_p["bytes_written"]],
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def indexer_fusion(device: str, quick: bool) -> list:
    from sgl_accel._bench import bench_patch

    return bench_patch("nsa-indexer-fusion", device, quick)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=("cat-skip", "indexer"), default=None)
    args = parser.parse_args()

    from sgl_accel.testing import standins

    standins.activate()
    import torch

    result = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu", "torch": torch.__version__}
    if args.only in (None, "cat-skip"):
        result["nsa-decode-cat-skip"] = decode_cat_skip(args.device, args.quick)
    if args.only in (None, "indexer"):
        result["nsa-indexer-fusion"] = indexer_fusion(args.device, args.quick)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
