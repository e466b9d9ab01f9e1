"""Equivalence cases for ``ascend-fia-extend-prefix`` (``AscendAttnBackend.forward_extend``).

A scenario is one prefill (EXTEND) batch of 1-4 requests, each with a cached
prefix (0 for a fresh request) and new tokens, under ``ASCEND_USE_FIA=1`` in the
non-MLA, non-CP branch. It is laid out as the release lays it out:

* sglang's own ``ReqToTokenPool`` maps every request (a random row, row 0 left
  out) to its token slots, on shuffled pages of ``page_size`` slots (page 0 left
  out: sglang keeps slot 0 for padding tokens);
* sglang's own ``MHATokenToKVPool`` holds the KV cache. Its per-layer buffer
  ``[slots, kv heads, head dim]`` views as ``[pages, page_size, kv heads * head
  dim]`` exactly as the NPU pool does, and its ``set_kv_buffer`` is plain
  indexing (the NPU pool's needs a torch_npu scatter op). Slots never written hold
  large random values, so a read outside a request's KV shows in the output. The
  prefix K/V are written before the call (an earlier chunk or the radix cache put
  them there); ``forward_extend`` writes the new tokens' K/V itself;
* a real ``ForwardBatch`` and a real ``AscendAttnBackend`` whose per-batch
  metadata (block tables, lengths) comes from its own ``init_forward_metadata``
  and whose masks come from its own ``AscendAttnMaskBuilder``. ``__init__`` needs
  an NPU device and a ModelRunner, so the instance is made with
  ``object.__new__`` and given the attributes the extend path reads.

The oracle is causal attention over each request's whole sequence (prefix + new
tokens), computed directly with ``scaled_dot_product_attention`` in float64 on
CPU, never through the FIA kernel. A scenario may append padding rows (tokens
beyond ``num_token_non_padded_cpu``, written to slot 0 as sglang does).

Running a case needs the patch applied; the original function comes from the
patched one's ``__sgl_accel_original__``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import types
from dataclasses import dataclass
from typing import Optional, Sequence

from . import Case, Comparison, compare, tolerance_for

PATCH_NAME = "ascend-fia-extend-prefix"
BACKEND_MODULE = "sglang.srt.hardware_backend.npu.attention.ascend_backend"
MEMORY_POOL_MODULE = "sglang.srt.mem_cache.memory_pool"
FORWARD_BATCH_MODULE = "sglang.srt.model_executor.forward_batch_info"
RADIX_MODULE = "sglang.srt.layers.radix_attention"


def _module(name: str):
    return importlib.import_module(name)


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def default_device() -> str:
    """The NPU when one is present (``sgl-accel verify``), else CPU with the test-bed kernels."""
    import torch

    npu = getattr(torch, "npu", None)
    return "npu" if npu is not None and npu.is_available() else "cpu"


@dataclass(frozen=True)
class Scenario:
    prefix_lens: Sequence[int]
    extend_lens: Sequence[int]
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 128
    page_size: int = 128
    dtype: str = "bfloat16"
    padding: int = 0  # rows after the batch's real tokens (DP-attention padding)
    seed: int = 0

    def __post_init__(self):
        if len(self.prefix_lens) != len(self.extend_lens) or not self.extend_lens:
            raise ValueError("one prefix length per request, at least one request")
        if min(self.extend_lens) < 1 or min(self.prefix_lens) < 0:
            raise ValueError("extend lengths >= 1, prefix lengths >= 0")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")

    @property
    def has_prefix(self) -> bool:
        return any(p > 0 for p in self.prefix_lens)


@dataclass
class Built:
    scenario: Scenario
    backend: object
    layer: object
    forward_batch: object
    kv_pool: object
    q: object  # [tokens (+ padding), heads * head_dim]: what RadixAttention hands the backend
    k: object  # [tokens (+ padding), kv heads, head_dim]
    v: object
    sequences: list  # per request (q, k, v) of the whole sequence, [length, heads, head_dim]
    expected: object  # oracle rows of the real tokens, float64 on CPU

    @property
    def num_real_tokens(self) -> int:
        return sum(int(n) for n in self.scenario.extend_lens)


def oracle(sequences, prefix_lens, scaling: float):
    """Each request's new-token rows of causal attention over its whole sequence (float64)."""
    import torch
    import torch.nn.functional as F

    rows = []
    for (q, k, v), prefix in zip(sequences, prefix_lens):
        out = F.scaled_dot_product_attention(
            q.double().transpose(0, 1), k.double().transpose(0, 1), v.double().transpose(0, 1),
            is_causal=True, scale=scaling, enable_gqa=True,
        )
        rows.append(out.transpose(0, 1)[prefix:].reshape(q.shape[0] - prefix, -1))
    return torch.cat(rows)


def make_backend(page_size: int, device: str, dtype):
    """A real ``AscendAttnBackend`` with what ``init_forward_metadata`` and the
    non-MLA extend path read (FIA on, no MLA, no CP, no sliding window)."""
    backend_mod = _module(BACKEND_MODULE)
    backend = object.__new__(backend_mod.AscendAttnBackend)
    backend.forward_metadata = None
    backend.device = device
    backend.page_size = page_size
    backend.use_fia = True
    backend.use_mla = False
    backend.use_alibi = False
    backend.is_dllm_model = False
    backend.is_hybrid_swa = False
    backend.use_sliding_window_kv_pool = False
    backend.attn_cp_size = 1
    backend.graph_mode = False
    backend.speculative_num_draft_tokens = None
    backend.speculative_step_id = 0
    masks = backend_mod.AscendAttnMaskBuilder(types.SimpleNamespace(dtype=dtype), device, True, False)
    backend.mask, backend.fia_mask = masks.mask, masks.fia_mask
    return backend


@contextlib.contextmanager
def attention_tp_size_known():
    """0.5.6.post1's ``init_forward_metadata`` asks for the attention TP size, which a bare
    process (``sgl-accel verify --emulate``) has not set: 1 for the block, then restored.
    Where the module variable does not exist (0.5.10 on) nothing is touched."""
    dp_attention = _module("sglang.srt.layers.dp_attention")
    unset = "_ATTN_TP_SIZE" in vars(dp_attention) and dp_attention._ATTN_TP_SIZE is None
    if unset:
        dp_attention._ATTN_TP_SIZE = 1
    try:
        yield
    finally:
        if unset:
            dp_attention._ATTN_TP_SIZE = None


def _forward_batch(**values):
    """A real ``ForwardBatch``: the given fields, every other field at its default."""
    cls = _module(FORWARD_BATCH_MODULE).ForwardBatch
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def build(scenario: Scenario, device: Optional[str] = None) -> Built:
    """Pools, batch, backend and oracle for ``scenario``; data drawn on CPU from its seed."""
    import torch

    sc = scenario
    device = device or default_device()
    dtype = _dtype(sc.dtype)
    gen = torch.Generator().manual_seed(sc.seed)
    hq, hkv, d, page = sc.num_heads, sc.num_kv_heads, sc.head_dim, sc.page_size
    bs = len(sc.extend_lens)
    prefix = [int(n) for n in sc.prefix_lens]
    extend = [int(n) for n in sc.extend_lens]
    totals = [p + e for p, e in zip(prefix, extend)]

    sequences = [
        tuple(torch.randn(t, heads, d, generator=gen).to(dtype) for heads in (hq, hkv, hkv)) for t in totals
    ]

    # Shuffled pages; page 0 (slot 0, sglang's padding slot) belongs to nobody.
    pages_per = [-(-t // page) for t in totals]
    num_pages = sum(pages_per) + 2
    order = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    memory_pool = _module(MEMORY_POOL_MODULE)
    req_pool = memory_pool.ReqToTokenPool(
        size=bs + 2, max_context_len=(max(pages_per) + 1) * page, device=device, enable_memory_saver=False
    )
    free_rows = req_pool.req_to_token.shape[0] - 1  # row 0 stays unused (sglang's padding row)
    rows = (torch.randperm(free_rows, generator=gen)[:bs] + 1).to(torch.int64)
    kv_pool = memory_pool.MHATokenToKVPool(
        size=(num_pages - 1) * page, page_size=page, dtype=dtype, head_num=hkv, head_dim=d, layer_num=1,
        device=device, enable_memory_saver=False, enable_alt_stream=False,
    )
    for buffers in (kv_pool.k_buffer, kv_pool.v_buffer):
        for buf in buffers:
            buf.copy_((50 * torch.randn(buf.shape, generator=gen)).to(buf.dtype))

    layer = _module(RADIX_MODULE).RadixAttention(
        num_heads=hq, head_dim=d, scaling=d**-0.5, num_kv_heads=hkv, layer_id=0
    )

    used, slots = 0, []
    for b, t in enumerate(totals):
        pages = torch.tensor(order[used : used + pages_per[b]])
        used += pages_per[b]
        pos = torch.arange(t)
        slots.append((pages[pos // page] * page + pos % page).to(torch.int32))
        req_pool.write((int(rows[b]), slice(0, t)), slots[b].to(device))
        if prefix[b]:
            # An earlier chunk (or the radix cache) stored the prefix K/V.
            _, k, v = sequences[b]
            loc = slots[b][: prefix[b]].to(torch.int64).to(device)
            kv_pool.set_kv_buffer(layer, loc, k[: prefix[b]].to(device), v[: prefix[b]].to(device))

    # The new tokens, as RadixAttention hands them to the backend; padding rows go to slot 0.
    def new_rows(i):
        return torch.cat([seq[i][p:] for seq, p in zip(sequences, prefix)])

    q, k, v = new_rows(0), new_rows(1), new_rows(2)
    out_cache_loc = torch.cat([s[p:] for s, p in zip(slots, prefix)]).to(torch.int64)
    if sc.padding:
        q = torch.cat([q, torch.randn(sc.padding, hq, d, generator=gen).to(dtype)])
        k = torch.cat([k, torch.randn(sc.padding, hkv, d, generator=gen).to(dtype)])
        v = torch.cat([v, torch.randn(sc.padding, hkv, d, generator=gen).to(dtype)])
        out_cache_loc = torch.cat([out_cache_loc, torch.zeros(sc.padding, dtype=torch.int64)])

    backend = make_backend(page, device, dtype)
    backend.token_to_kv_pool = kv_pool  # 0.5.13 reads both pools from the backend
    backend.req_to_token = req_pool.req_to_token
    backend.req_to_token_pool = req_pool
    seq_lens = torch.tensor(totals, dtype=torch.int64)
    forward_batch = _forward_batch(
        forward_mode=_module(FORWARD_BATCH_MODULE).ForwardMode.EXTEND,
        batch_size=bs,
        input_ids=torch.zeros(q.shape[0], dtype=torch.int64, device=device),
        req_pool_indices=rows.to(device),
        seq_lens=seq_lens.to(device),
        seq_lens_cpu=seq_lens,
        seq_lens_sum=sum(totals),
        out_cache_loc=out_cache_loc.to(device),
        extend_num_tokens=sum(extend),
        extend_seq_lens=torch.tensor(extend, dtype=torch.int32, device=device),
        extend_prefix_lens=torch.tensor(prefix, dtype=torch.int32, device=device),
        extend_seq_lens_cpu=extend,
        extend_prefix_lens_cpu=prefix,
        req_to_token_pool=req_pool,
        token_to_kv_pool=kv_pool,
        attn_backend=backend,
        num_token_non_padded_cpu=sum(extend),
    )
    with attention_tp_size_known():
        backend.init_forward_metadata(forward_batch)
    return Built(
        scenario=sc,
        backend=backend,
        layer=layer,
        forward_batch=forward_batch,
        kv_pool=kv_pool,
        q=q.reshape(q.shape[0], hq * d).to(device),
        k=k.to(device),
        v=v.to(device),
        sequences=sequences,
        expected=oracle(sequences, prefix, layer.scaling),
    )


def run(function, built: Built):
    """Call a ``forward_extend`` implementation bound to the built backend (saves the new K/V)."""
    return function(
        built.backend, built.q.clone(), built.k.clone(), built.v.clone(), built.layer, built.forward_batch
    )


def functions():
    """(patched forward_extend, original) or raise if the patch is not applied."""
    current = _module(BACKEND_MODULE).AscendAttnBackend.__dict__["forward_extend"]
    original = getattr(current, "__sgl_accel_original__", None)
    if original is None:
        raise RuntimeError(f"{PATCH_NAME} is not applied (AscendAttnBackend.forward_extend is the installed function)")
    return current, original


def scaled_tolerance(reference, dtype) -> float:
    """``tolerance_for(dtype)`` relative to the reference's magnitude (one rounding step
    of bf16 grows with |x|)."""
    return tolerance_for(dtype) * max(1.0, float(reference.abs().max()) if reference.numel() else 1.0)


def run_scenario(scenario: Scenario, device: Optional[str] = None) -> list:
    """Patched vs the oracle; without any prefix also patched vs original, bit for bit."""
    import torch

    patched, original = functions()
    device = device or default_device()
    if device != "cpu" and scenario.dtype == "float32":
        scenario = dataclasses.replace(scenario, dtype="bfloat16")  # the real op takes fp16/bf16 only
    built = build(scenario, device)
    n = built.num_real_tokens
    out = run(patched, built)
    tol = scaled_tolerance(built.expected, _dtype(scenario.dtype))
    results = [compare("output vs causal SDPA over prefix + new tokens", out[:n], built.expected, tol)]
    if scenario.padding and scenario.has_prefix:
        results.append(compare("padding rows are zero", out[n:], torch.zeros_like(out[n:]), exact=True))
    if not scenario.has_prefix:
        # No prefix anywhere: the release's own per-request path runs (padding rows of
        # that path are uninitialised memory, so only real rows are compared).
        reference = run(original, built)
        results.append(compare("output vs original (no prefix: same path)", out[:n], reference[:n], exact=True))
    return results


def _case(name: str, description: str, **kwargs) -> Case:
    def run_case(seed: int) -> list:
        return run_scenario(Scenario(seed=seed, **kwargs))

    return Case(PATCH_NAME, name, run_case, description)


CASES: list = [
    _case(
        "chunk2-bs1-gqa4-d128",
        "second chunk of a chunked prefill: 256 cached tokens (2 pages), 96 new, bf16",
        prefix_lens=[256], extend_lens=[96], num_heads=8, num_kv_heads=2, head_dim=128,
    ),
    _case(
        "radix-mixed-bs4-gqa8-d64",
        "radix-cache hits and fresh requests in one batch, one new token among them, fp32",
        prefix_lens=[0, 37, 300, 0], extend_lens=[5, 130, 1, 64], num_heads=8, num_kv_heads=1, head_dim=64,
        dtype="float32",
    ),
    _case(
        "prefix-short-bs2-gqa1-d64",
        "short prefixes inside the first page, MHA, bf16",
        prefix_lens=[3, 127], extend_lens=[40, 129], num_heads=4, num_kv_heads=4, head_dim=64,
    ),
    _case(
        "prefix-padded-bs2-gqa2-d128",
        "cached prefix with padding rows after the real tokens: trimmed before the call, zeros after",
        prefix_lens=[129, 0], extend_lens=[17, 9], num_heads=4, num_kv_heads=2, head_dim=128, padding=6,
        dtype="float32",
    ),
    _case(
        "no-prefix-bs3-gqa2-d128",
        "fresh requests only: the release's per-request path, bit for bit",
        prefix_lens=[0, 0, 0], extend_lens=[1, 90, 33], num_heads=4, num_kv_heads=2, head_dim=128,
    ),
]


# --------------------------------------------------------------------------- benchmark


def bench_pair(scenario: Scenario, device: str):
    """(original, patched): one ``forward_extend`` call each on the same built batch.

    When the patch is not applied it is applied (gates forced) just long enough to take
    the patched function, then reverted: the process is left as it was."""
    try:
        patched, original = functions()
    except RuntimeError:
        import sgl_accel

        report = sgl_accel.apply([PATCH_NAME], force=True, allow_untested=True)[PATCH_NAME]
        if report.state != "applied":
            raise RuntimeError(f"{PATCH_NAME} is {report.state}: {report.reason}") from None
        patched, original = functions()
        sgl_accel.revert([PATCH_NAME])
    built = build(scenario, device)
    run(original, built)  # one-time costs (the FIA model checks its mask template once) before counting
    return (lambda: run(original, built)), (lambda: run(patched, built))


def _bench_cases() -> list:
    try:
        from sgl_accel._bench import BenchCase
    except ImportError:  # an sgl_accel without the bench module
        return []
    no_prefix = Scenario(prefix_lens=[0, 0, 0, 0], extend_lens=[16, 64, 8, 100], num_heads=8, num_kv_heads=2)
    return [
        BenchCase(
            PATCH_NAME,
            "forward_extend no prefix b4 gqa4 d128 bf16",
            lambda device: bench_pair(no_prefix, device),
            "a batch without cached prefix keeps the release's per-request path: expected ratio 1",
        )
    ]


BENCH: list = _bench_cases()
