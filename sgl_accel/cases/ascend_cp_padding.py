"""Equivalence cases for ``ascend-cp-padding``.

* One sequence where the defect cannot occur (no cached prefix, or no padding): every field of
  the release's ``ContextParallelMetadata`` from the patched builder equals the original's,
  for every CP rank (exact).
* One sequence with a cached prefix and padding: the KV lengths count the real prefix.
* The block table of a padded CP extend covers the padding; without CP it is unchanged.

The builder runs with the server settings of zigzag prefill CP (``server_args_for_cp``) when the
process has none (``sgl-accel verify`` outside a server). Tensors the release makes on "cuda"
go to the device present (torch_npu maps "cuda" to the NPU; on CPU the case maps it to the CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import types

from . import Case, Comparison

PATCH_NAME = "ascend-cp-padding"
CP_UTILS_MODULE = "sglang.srt.layers.utils.cp_utils"


def server_args_for_cp(cp_size: int):
    """The release's ServerArgs defaults (no __post_init__: it would check a model) with zigzag prefill CP on."""
    from sglang.srt.server_args import ServerArgs

    args = object.__new__(ServerArgs)
    for f in dataclasses.fields(ServerArgs):
        if f.default is not dataclasses.MISSING:
            setattr(args, f.name, f.default)
        elif f.default_factory is not dataclasses.MISSING:
            setattr(args, f.name, f.default_factory())
    args.enable_prefill_context_parallel = True
    args.prefill_cp_mode = "in-seq-split"
    args.attn_cp_size = cp_size
    args.tp_size = cp_size
    return args


@contextlib.contextmanager
def cp_settings(cp_size: int):
    """Zigzag prefill-CP server args if the process has none; "cuda" tensors on the CPU when there is no device."""
    import torch
    from sglang.srt import server_args

    saved_args, saved_tensor = server_args._global_server_args, torch.tensor
    if saved_args is None:
        server_args._global_server_args = server_args_for_cp(cp_size)
    if not torch.cuda.is_available() and not (hasattr(torch, "npu") and torch.npu.is_available()):

        def tensor(*args, **kwargs):
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return saved_tensor(*args, **kwargs)

        torch.tensor = tensor
    try:
        yield
    finally:
        server_args._global_server_args = saved_args
        torch.tensor = saved_tensor


def _builders():
    import importlib

    patched = importlib.import_module(CP_UTILS_MODULE).prepare_context_parallel_metadata
    original = getattr(patched, "__sgl_accel_original__", None)
    if original is None:
        raise RuntimeError(f"{PATCH_NAME} is not applied; apply it first")
    return patched, original


def _differences(a, b) -> list:
    import torch

    out = []
    for f in dataclasses.fields(type(b)):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(y, torch.Tensor):
            same = isinstance(x, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.cpu(), y.cpu())
        else:
            same = type(x) is type(y) and x == y
        if not same:
            out.append(f.name)
    return out


def _release_fields(seed: int) -> list:
    patched, original = _builders()
    results = []
    for cp, extend, prefix, pad in ((2, 37 + seed, 0, 1), (4, 61, 130, 0), (2, 300, 5, 0), (4, 129, 0, 3)):
        with cp_settings(cp):
            for rank in range(cp):
                ref = original(extend + pad, rank, cp, [prefix + extend])
                got = patched(extend + pad, rank, cp, [prefix + extend], extend_seqs_len=[extend])
                diff = _differences(got, ref)
                results.append(Comparison(f"cp {cp} rank {rank} extend {extend} prefix {prefix} pad {pad}: release fields",
                                          float(len(diff)), 0.0, exact=True, note=", ".join(diff)))
    return results


def _real_prefix(seed: int) -> list:
    patched, _ = _builders()
    prefix, extend, pad, cp = 5 + seed, 30, 2, 2
    results = []
    with cp_settings(cp):
        for rank in range(cp):
            meta = patched(extend + pad, rank, cp, [prefix + extend], extend_seqs_len=[extend])
            want = prefix + sum(meta.split_list[: rank + 1])
            results.append(Comparison(f"rank {rank} kv_len_prev counts the real prefix", float(abs(meta.kv_len_prev - want)), 0.0, exact=True))
    return results


def _block_table(seed: int) -> list:
    import importlib

    import torch

    from .ascend_cp_attn_batch import default_device, make_backend

    device = default_device()
    fb = importlib.import_module("sglang.srt.model_executor.forward_batch_info")
    req_to_token = torch.arange(3 * 1024, dtype=torch.int32).reshape(3, 1024).to(device)
    results = []
    for cp_size, padded, want_tokens in ((2, 40 + 126 + 2, 127 + 2), (1, 40 + 126 + 2, 127)):
        backend = make_backend(128, req_to_token, device)
        backend.attn_cp_size = cp_size
        seq = torch.tensor([40, 127])
        batch = types.SimpleNamespace(
            forward_mode=fb.ForwardMode.EXTEND, seq_lens=seq.to(device), seq_lens_cpu=seq,
            req_pool_indices=torch.tensor([0, 2]).to(device), req_to_token_pool=backend.req_to_token_pool,
            extend_seq_lens=torch.tensor([40, 126]).to(device), extend_seq_lens_cpu=[40, 126],
            extend_prefix_lens=torch.tensor([0, 1]).to(device), extend_prefix_lens_cpu=[0, 1],
            input_ids=torch.zeros(padded, dtype=torch.int64).to(device), spec_info=None,
        )
        backend.init_forward_metadata(batch)
        width = backend.forward_metadata.block_tables.shape[1]
        results.append(Comparison(f"cp {cp_size}: block table pages for {want_tokens} tokens", float(abs(width - -(-want_tokens // 128))), 0.0, exact=True))
    return results


CASES: list = [
    Case(PATCH_NAME, "bs1-release-fields", _release_fields, "one sequence without prefix+padding: every release field equals the original's"),
    Case(PATCH_NAME, "bs1-prefix-padding", _real_prefix, "cached prefix and padding: KV lengths count the real prefix"),
    Case(PATCH_NAME, "block-table-padding", _block_table, "padded CP extend: the block table covers the padding; without CP unchanged"),
]
