"""Equivalence cases for ``ascend-cp-prefill-batch`` (opt-in).

* ``can_cp_split`` decides exactly as the original for one sequence (every mode and length
  tried), and for several sequences splits only when each has at least ``2 * cp_size`` extend
  tokens, the mode is not MIXED and the per-sequence pieces (``ascend-cp-padding``,
  ``ascend-cp-attn-batch``) are applied.

The batched attention itself needs several processes; tests/test_cp_prefill_multiprocess.py
runs it over gloo.
"""

from __future__ import annotations

import types

from . import Case, Comparison
from .ascend_cp_padding import cp_settings

PATCH_NAME = "ascend-cp-prefill-batch"
CP_UTILS_MODULE = "sglang.srt.layers.utils.cp_utils"
NEEDS = ("ascend-cp-padding", "ascend-cp-attn-batch")


def _batch(extend, mode):
    import importlib

    import torch

    fb = importlib.import_module("sglang.srt.model_executor.forward_batch_info")
    seq = torch.tensor([n + 5 for n in extend])
    return types.SimpleNamespace(forward_mode=getattr(fb.ForwardMode, mode), seq_lens_cpu=seq, extend_seq_lens_cpu=list(extend))


def _split_decisions(seed: int) -> list:
    import importlib

    from .. import _loader

    cp_utils = importlib.import_module(CP_UTILS_MODULE)
    patched = cp_utils.can_cp_split
    original = getattr(patched, "__sgl_accel_original__", None)
    if original is None:
        raise RuntimeError(f"{PATCH_NAME} is not applied; apply it first")
    ready = all(_loader.status([n])[n].state == "applied" for n in NEEDS)
    results = []
    with cp_settings(2):
        for cp in (2, 4):
            wrong = 0
            for mode in ("EXTEND", "MIXED", "DECODE"):
                for n in range(1, 40 + seed):
                    batch = _batch([n], mode)
                    wrong += patched(n, cp, batch) != original(n, cp, batch)
            results.append(Comparison(f"cp {cp}: one sequence decided as the original", float(wrong), 0.0, exact=True))
            wrong = 0
            for extend, mode in (([40, 9, 2 * cp], "EXTEND"), ([40, 2 * cp - 1], "EXTEND"), ([40, 9], "MIXED")):
                want = ready and mode == "EXTEND" and min(extend) >= 2 * cp
                wrong += patched(sum(extend), cp, _batch(extend, mode)) != want
            results.append(Comparison(f"cp {cp}: several sequences split only when each can be (pieces applied: {ready})", float(wrong), 0.0, exact=True))
    return results


CASES: list = [
    Case(PATCH_NAME, "can-cp-split", _split_decisions, "one sequence as the release; several only when every one qualifies"),
]
