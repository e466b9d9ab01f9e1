"""Equivalence cases for ``ascend-cp-attn-batch`` (``AscendAttnBackend.do_cp_attn_fia``).

A scenario is a batch of sequences (cached prefix + extend tokens) attended under
context parallelism of size ``cp_size``. Every CP rank is emulated in turn: its
local query is the rank's zigzag share of the extend tokens, and the paged KV
cache holds the full K/V of every sequence (what ``_cp_allgather_and_save_kv_npu``
writes before the call). The real backend method runs once per rank.

The oracle is full causal attention computed with
``torch.nn.functional.scaled_dot_product_attention`` over each whole sequence
(prefix included), never through the FIA kernel; each rank's output must equal
the oracle rows of the tokens it owns.

Metadata comes in the two forms the patched function must accept:

* ``"scalar"``: the releases' ``ContextParallelMetadata`` (0.5.11, 0.5.12.post1),
  batch 1 only, fields ``actual_seq_q_prev`` / ``kv_len_prev`` / ...;
* ``"per-sequence"``: the layout of upstream #23269 (sglang 0.5.13's
  ``prepare_context_parallel_metadata``), built here by ``build_cp_metadata``
  into ``PerSequenceCPMetadata``, a stand-alone class with the same field names
  (the installed release may not have them).

Running a case needs the patch applied (it applies by default on 0.5.11 and
0.5.12.post1; ``sgl-accel verify`` applies it as ``apply()`` would).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from . import Case, Comparison, compare, tolerance_for

PATCH_NAME = "ascend-cp-attn-batch"
BACKEND_MODULE = "sglang.srt.hardware_backend.npu.attention.ascend_backend"
CP_UTILS_MODULE = "sglang.srt.layers.utils.cp_utils"
FORMS = ("scalar", "per-sequence")


# --------------------------------------------------------------------------- metadata


@dataclass
class PerSequenceCPMetadata:
    """Context-parallel metadata with per-sequence fields (the #23269 names).

    Lists are Python ints; the ``*_tensor`` fields are int32 tensors on CPU.
    """

    split_list: List[int] = None
    zigzag_index: List[int] = None
    cp_reverse_index: List[int] = None
    reverse_split_len: List[int] = None
    per_rank_actual_token: List[int] = None
    max_rank_len: List[int] = None
    kv_len_prev_tensor: object = None
    kv_len_next_tensor: object = None
    actual_seq_q_prev_tensor: object = None
    actual_seq_q_next_tensor: object = None
    cu_seqlens_q_prev_tensor: object = None
    cu_seqlens_q_next_tensor: object = None
    total_q_prev_tokens: int = 0
    total_q_next_tokens: int = 0
    max_seqlen_q_prev: int = 0
    max_seqlen_q_next: int = 0
    kv_len_prev_list: List[int] = None
    kv_len_next_list: List[int] = None
    actual_seq_q_prev_list: List[int] = None
    actual_seq_q_next_list: List[int] = None
    total_seq_lens: int = 0
    bs: int = 1


def block_sizes(extend_len: int, cp_size: int) -> list[int]:
    """One sequence's extend tokens cut into 2*cp_size contiguous blocks; the
    first ``extend_len % (2*cp_size)`` blocks carry one extra token."""
    segments = 2 * cp_size
    base, extra = divmod(int(extend_len), segments)
    return [base + (1 if i < extra else 0) for i in range(segments)]


def _prefix_sum(values) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out


def build_cp_metadata(extend_lens: Sequence[int], prefix_lens: Sequence[int], cp_rank: int, cp_size: int, form: str = "per-sequence"):
    """Metadata of CP rank ``cp_rank`` for one extend batch (no padding tokens).

    Rank r owns block r ("prev") and block 2*cp_size-1-r ("next") of every
    sequence; its local tokens are all sequences' prev blocks, then all their next
    blocks. KV lengths count the cached prefix (the non-DSA convention).
    """
    import torch

    extend_lens = [int(n) for n in extend_lens]
    prefix_lens = [int(n) for n in prefix_lens]
    if len(prefix_lens) != len(extend_lens):
        raise ValueError("one prefix length per sequence")
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} outside [0, {cp_size})")
    bs, segments = len(extend_lens), 2 * cp_size
    blocks = [block_sizes(n, cp_size) for n in extend_lens]
    prev_block, next_block = cp_rank, segments - 1 - cp_rank

    q_prev = [b[prev_block] for b in blocks]
    q_next = [b[next_block] for b in blocks]
    # A chunk's queries are the tail of the KV range it attends: everything up to
    # the end of its own block, prefix included.
    kv_prev = [p + sum(b[: prev_block + 1]) for p, b in zip(prefix_lens, blocks)]
    kv_next = [p + sum(b[: next_block + 1]) for p, b in zip(prefix_lens, blocks)]

    split_list = [n for b in blocks for n in b]
    # Pieces of split_list are ordered [s0.b0 .. s0.b_{2cp-1}, s1.b0, ...].
    zigzag_index = [s * segments + prev_block for s in range(bs)] + [s * segments + next_block for s in range(bs)]
    per_rank = [sum(b[r] + b[segments - 1 - r] for b in blocks) for r in range(cp_size)]

    # After an all-gather the pieces arrive as [rank0 prevs, rank0 nexts, rank1 prevs, ...];
    # reverse_split_len sizes them, cp_reverse_index puts them back in sequence order.
    gathered = []  # (sequence, block) in all-gather order
    for r in range(cp_size):
        gathered += [(s, r) for s in range(bs)]
        gathered += [(s, segments - 1 - r) for s in range(bs)]
    reverse_split_len = [blocks[s][blk] for s, blk in gathered]
    position = {piece: i for i, piece in enumerate(gathered)}
    cp_reverse_index = [position[(s, blk)] for s in range(bs) for blk in range(segments)]

    if form == "scalar":
        if bs != 1:
            raise ValueError("scalar context-parallel metadata describes exactly one sequence")
        cp_utils = _module(CP_UTILS_MODULE)
        cls = cp_utils.ContextParallelMetadata
        t = lambda n: torch.tensor([n], dtype=torch.int32)  # noqa: E731
        return cls(
            split_list=split_list,
            max_rank_len=[-(-extend_lens[0] // cp_size)] * cp_size,
            zigzag_index=zigzag_index,
            per_rank_actual_token=per_rank,
            reverse_split_len=reverse_split_len,
            cp_reverse_index=cp_reverse_index,
            kv_len_prev=kv_prev[0],
            kv_len_next=kv_next[0],
            actual_seq_q_prev=q_prev[0],
            actual_seq_q_next=q_next[0],
            kv_len_prev_tensor=t(kv_prev[0]),
            kv_len_next_tensor=t(kv_next[0]),
            actual_seq_q_prev_tensor=t(q_prev[0]),
            actual_seq_q_next_tensor=t(q_next[0]),
            total_seq_lens=torch.tensor(extend_lens[0]),
        )
    if form != "per-sequence":
        raise ValueError(f"unknown metadata form {form!r}; one of {FORMS}")

    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    cu_prev, cu_next = [0] + _prefix_sum(q_prev), [0] + _prefix_sum(q_next)
    return PerSequenceCPMetadata(
        split_list=split_list,
        zigzag_index=zigzag_index,
        cp_reverse_index=cp_reverse_index,
        reverse_split_len=reverse_split_len,
        per_rank_actual_token=per_rank,
        max_rank_len=[max(per_rank)] * cp_size,
        kv_len_prev_tensor=i32(kv_prev),
        kv_len_next_tensor=i32(kv_next),
        actual_seq_q_prev_tensor=i32(q_prev),
        actual_seq_q_next_tensor=i32(q_next),
        cu_seqlens_q_prev_tensor=i32(cu_prev),
        cu_seqlens_q_next_tensor=i32(cu_next),
        total_q_prev_tokens=cu_prev[-1],
        total_q_next_tokens=cu_next[-1],
        max_seqlen_q_prev=max(q_prev),
        max_seqlen_q_next=max(q_next),
        kv_len_prev_list=kv_prev,
        kv_len_next_list=kv_next,
        actual_seq_q_prev_list=q_prev,
        actual_seq_q_next_list=q_next,
        total_seq_lens=sum(extend_lens),
        bs=bs,
    )


def local_token_index(meta):
    """Indices (into the batch's concatenated extend tokens) of the rank's local tokens, in order."""
    import torch

    total = sum(meta.split_list)
    pieces = torch.split(torch.arange(total), list(meta.split_list))
    return torch.cat([pieces[i] for i in meta.zigzag_index])


# --------------------------------------------------------------------------- scenario


@dataclass
class Scenario:
    extend_lens: Sequence[int]
    prefix_lens: Sequence[int]
    cp_size: int
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 128
    page_size: int = 128
    form: str = "per-sequence"
    dtype: str = "float32"
    seed: int = 0

    @property
    def bs(self) -> int:
        return len(self.extend_lens)


@dataclass
class RankRun:
    """One emulated CP rank: the arguments for do_cp_attn_fia and the expected output."""

    rank: int
    meta: object
    q: object  # [local tokens, num_heads * head_dim]
    forward_batch: object
    expected: object  # oracle rows for the local tokens, same shape as the output
    local_index: object


@dataclass
class Built:
    scenario: Scenario
    backend: object
    layer: object
    k_cache: object  # [slots, num_kv_heads, head_dim]
    v_cache: object
    ranks: list = field(default_factory=list)


def _module(name: str):
    import importlib

    return importlib.import_module(name)


def default_device() -> str:
    """The NPU when one is present (``sgl-accel verify``), else CPU with the test-bed kernels."""
    import torch

    npu = getattr(torch, "npu", None)
    return "npu" if npu is not None and npu.is_available() else "cpu"


def make_backend(page_size: int, req_to_token, device: str = "cpu"):
    """A real ``AscendAttnBackend`` instance with only what the CP path reads.

    ``__init__`` needs an NPU (it allocates on ``device="npu"``) and a full
    ModelRunner, so the instance is made with ``object.__new__`` and given the
    attributes that ``init_forward_metadata`` and ``do_cp_attn_fia`` read; the
    FIA mask comes from the backend's own mask builder.
    """
    backend_mod = _module(BACKEND_MODULE)
    cls = backend_mod.AscendAttnBackend
    backend = object.__new__(cls)
    backend.page_size = page_size
    backend.device = device
    backend.forward_metadata = None
    backend.graph_mode = False
    backend.use_mla = False
    backend.is_hybrid_swa = False
    backend.use_sliding_window_kv_pool = False  # read by 0.5.13's init_forward_metadata
    backend.attn_cp_size = 1  # set by __init__ from the model runner
    backend.speculative_num_draft_tokens = None
    backend.speculative_step_id = 0
    backend.req_to_token_pool = types.SimpleNamespace(req_to_token=req_to_token)
    backend.token_to_kv_pool = None
    backend.fia_mask = backend_mod.AscendAttnMaskBuilder.generate_mask_flag(2048).to(device)
    return backend


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def build(scenario: Scenario, device: Optional[str] = None) -> Built:
    """Inputs for every CP rank of ``scenario``, the paged cache, and the oracle.

    Data is drawn on CPU from the scenario's seed and moved to ``device``; the
    oracle is computed on CPU in float64.
    """
    import torch
    import torch.nn.functional as F

    sc = scenario
    device = device or default_device()
    if sc.num_heads % sc.num_kv_heads:
        raise ValueError("num_heads must be a multiple of num_kv_heads")
    gen = torch.Generator().manual_seed(sc.seed)
    dtype = _dtype(sc.dtype)
    hq, hkv, d, page = sc.num_heads, sc.num_kv_heads, sc.head_dim, sc.page_size
    totals = [int(p) + int(n) for p, n in zip(sc.prefix_lens, sc.extend_lens)]

    # Whole sequences (cached prefix + extend), in the model dtype.
    qs = [torch.randn(t, hq, d, generator=gen).to(dtype) for t in totals]
    ks = [torch.randn(t, hkv, d, generator=gen).to(dtype) for t in totals]
    vs = [torch.randn(t, hkv, d, generator=gen).to(dtype) for t in totals]

    # Paged pool with shuffled pages; slots never written hold large values, so
    # reading past a sequence's KV length would show in the output.
    pages_per_seq = [-(-t // page) for t in totals]
    num_pages = sum(pages_per_seq) + 3
    page_order = torch.randperm(num_pages, generator=gen)
    k_cache = (torch.randn(num_pages * page, hkv, d, generator=gen) * 50).to(dtype)
    v_cache = (torch.randn(num_pages * page, hkv, d, generator=gen) * 50).to(dtype)
    max_ctx = max(pages_per_seq) * page + page
    pool_rows = sc.bs + 2
    req_to_token = torch.zeros(pool_rows, max_ctx, dtype=torch.int32)
    req_pool_indices = torch.randperm(pool_rows, generator=gen)[: sc.bs].to(torch.int64)
    used = 0
    for s, t in enumerate(totals):
        pages = page_order[used : used + pages_per_seq[s]]
        used += pages_per_seq[s]
        pos = torch.arange(t)
        slots = (pages[pos // page] * page + pos % page).to(torch.int32)
        req_to_token[req_pool_indices[s], :t] = slots
        k_cache[slots.long()] = ks[s]
        v_cache[slots.long()] = vs[s]

    layer = _module("sglang.srt.layers.radix_attention").RadixAttention(
        num_heads=hq, head_dim=d, scaling=d**-0.5, num_kv_heads=hkv, layer_id=0
    )

    # Oracle: causal SDPA over each whole sequence, in float64.
    full = []
    for q, k, v in zip(qs, ks, vs):
        o = F.scaled_dot_product_attention(
            q.double().transpose(0, 1), k.double().transpose(0, 1), v.double().transpose(0, 1),
            is_causal=True, scale=layer.scaling, enable_gqa=True,
        )
        full.append(o.transpose(0, 1))
    # Extend rows only, concatenated in batch order (the order split_list uses).
    ext_out = torch.cat([o[p:] for o, p in zip(full, sc.prefix_lens)])
    ext_q = torch.cat([q[p:] for q, p in zip(qs, sc.prefix_lens)])

    backend = make_backend(page, req_to_token.to(device), device)
    forward_mode = _module("sglang.srt.model_executor.forward_batch_info").ForwardMode.EXTEND
    seq_lens = torch.tensor(totals, dtype=torch.int64)
    batch_fields = dict(
        forward_mode=forward_mode,
        seq_lens=seq_lens.to(device),
        seq_lens_cpu=seq_lens,
        req_pool_indices=req_pool_indices.to(device),
        req_to_token_pool=backend.req_to_token_pool,
        extend_seq_lens=torch.tensor(list(sc.extend_lens), dtype=torch.int32, device=device),
        extend_seq_lens_cpu=[int(n) for n in sc.extend_lens],
        extend_prefix_lens=torch.tensor(list(sc.prefix_lens), dtype=torch.int32, device=device),
        extend_prefix_lens_cpu=[int(n) for n in sc.prefix_lens],
        spec_info=None,
        out_cache_loc=None,
    )
    # The backend's own per-batch metadata (block tables) from the full sequences.
    backend.init_forward_metadata(types.SimpleNamespace(**batch_fields, attn_cp_metadata=None))

    built = Built(sc, backend, layer, k_cache.to(device), v_cache.to(device))
    for rank in range(sc.cp_size):
        meta = build_cp_metadata(sc.extend_lens, sc.prefix_lens, rank, sc.cp_size, sc.form)
        idx = local_token_index(meta)
        q_local = ext_q[idx].reshape(len(idx), hq * d).contiguous().to(device)
        expected = ext_out[idx].reshape(len(idx), hq * d)
        fb = types.SimpleNamespace(**batch_fields, attn_cp_metadata=meta)
        built.ranks.append(RankRun(rank, meta, q_local, fb, expected, idx))
    return built


def backend_class():
    return _module(BACKEND_MODULE).AscendAttnBackend


def run_rank(function, built: Built, rank: RankRun):
    """Call a ``do_cp_attn_fia`` implementation (bound to the real backend) for one rank."""
    return function(built.backend, rank.q.clone(), built.k_cache, built.v_cache, built.layer, rank.forward_batch)


def current_and_original():
    """(patched do_cp_attn_fia, original) or raise if the patch is not applied."""
    current = backend_class().__dict__["do_cp_attn_fia"]
    original = getattr(current, "__sgl_accel_original__", None)
    if original is None:
        raise RuntimeError(
            f"{PATCH_NAME} is not applied; apply it first"
        )
    return current, original


def run_scenario(scenario: Scenario, device: Optional[str] = None) -> list[Comparison]:
    """Patched vs. oracle for every rank; for scalar metadata also patched vs. original (exact)."""
    import dataclasses

    import torch

    patched, original = current_and_original()
    device = device or default_device()
    if device != "cpu" and scenario.dtype == "float32":
        scenario = dataclasses.replace(scenario, dtype="bfloat16")  # the real op takes fp16/bf16 only
    built = build(scenario, device)
    tol = tolerance_for(_dtype(scenario.dtype))
    results = []
    for rank in built.ranks:
        out = run_rank(patched, built, rank)
        results.append(compare(f"rank {rank.rank} output vs causal SDPA", out, rank.expected, tol))
        if scenario.form == "scalar":
            ref = run_rank(original, built, rank)
            results.append(compare(f"rank {rank.rank} output vs original", out, ref, exact=True))
    # Every extend token must be owned by exactly one rank (the layout is a partition).
    owned = torch.cat([r.local_index for r in built.ranks]).sort().values
    total = sum(int(n) for n in scenario.extend_lens)
    ok = owned.tolist() == list(range(total))
    results.append(Comparison("ranks partition the extend tokens", 0.0 if ok else float("inf"), 0.0, exact=True))
    return results


def _case(name: str, description: str, **kwargs) -> Case:
    def run(seed: int) -> list:
        return run_scenario(Scenario(seed=seed, **kwargs))

    return Case(PATCH_NAME, name, run, description)


CASES: list = [
    _case(
        "bs1-scalar-cp2-prefix",
        "one sequence, scalar (release) metadata, CP 2, cached prefix, GQA: equals the original and the oracle",
        extend_lens=[37], prefix_lens=[150], cp_size=2, form="scalar",
    ),
    _case(
        "bs1-scalar-cp4",
        "one sequence, scalar metadata, CP 4, no prefix",
        extend_lens=[61], prefix_lens=[0], cp_size=4, num_heads=4, num_kv_heads=4, form="scalar",
    ),
    _case(
        "bs3-cp2-prefix-gqa",
        "three sequences of uneven length, per-sequence metadata, CP 2, cached prefixes, GQA 4:1",
        extend_lens=[10, 5, 23], prefix_lens=[4, 0, 130], cp_size=2, num_heads=8, num_kv_heads=2,
    ),
    _case(
        "bs4-cp4-uneven",
        "four sequences, per-sequence metadata, CP 4, uneven lengths and prefixes",
        extend_lens=[8, 33, 17, 9], prefix_lens=[0, 200, 3, 127], cp_size=4,
    ),
    _case(
        "bs2-cp2-bf16",
        "two sequences in bfloat16, per-sequence metadata, CP 2",
        extend_lens=[19, 12], prefix_lens=[7, 140], cp_size=2, dtype="bfloat16",
    ),
]
