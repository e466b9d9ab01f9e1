"""Equivalence and bench cases for ``nsa-decode-cat-skip``.

One MLA attention layer of a DeepSeek-V3.2 / GLM-5 shaped model (absorbed q: kv_lora_rank
512 + rope 64 = 576 per head, one latent KV head) runs through the real code of the
installed release: ``DeepseekMLAForwardMixin.forward_absorb_core`` (called on a small layer
object that inherits the real mixin) -> the real ``RadixAttention`` -> the real
``AttentionBackend.forward`` -> the real ``NativeSparseAttnBackend.forward_decode`` /
``forward_extend`` -> the sparse-MLA entry point. The KV pool is a real
``MLATokenToKVPool``, the batch a real ``ForwardBatch``, the backend's metadata a real
``NSAMetadata`` filled as ``init_forward_metadata`` fills it for decode (its constructor
needs a model runner on a GPU, so the backend instance is made with ``object.__new__`` and
given the attributes ``__init__`` sets on HIP). Only the server-side bits are stand-ins:
the global server args read by ``_skip_rope_for_nsa_tilelang_fused`` and the layer's
``o_proj``.

Platforms are emulated by setting the releases' module constants for the duration of a run
(``_is_hip``, ``_use_aiter``, ``_is_gfx95_supported``, ``_use_aiter_gfx95``, ``_is_cuda``,
``_is_musa``; on "rocm" also ``layers/attention/utils._is_cuda`` = False so that
``concat_mla_absorb_q_general`` is the ``torch.cat`` HIP runs). Kernels: where the machine
has no aiter, aiter's ``fused_qk_rope_cat_and_cache_mla`` is the model below, and the
tilelang / aiter decode entry points are ``sgl_accel.testing.kernels.rocm``'s capture
points (``DecodeRecorder``: plain-torch sparse MLA attention), which keep the very tensors
they receive so that storage sharing can be checked.

A run returns the layer output, the KV cache afterwards, the q each entry point received,
the ``q_cat`` the fused kernel produced, and an ``OpCounter`` of the whole layer call.
``evaluate(spec)`` compares original and patched: outputs and KV cache, the entry points'
q byte for byte, and what the op counter says was removed (exactly one ``aten.cat`` of
tokens x heads x 576 elements on ROCm decode with tilelang/aiter, nothing anywhere else).

On a machine with real aiter the fused kernel is aiter's own, but the decode entry points
are always the capture points (the recorder has no pass-through to the real tilelang /
aiter kernels), so ``sgl-accel verify`` on ROCm checks the patched data flow with the
reference attention, not the device kernels' numerics.

Running ``CASES`` needs the patch applied (the original is the patched function's
``__sgl_accel_original__``). ``decode_pair`` / ``BENCH`` build the patched functions
themselves when the patch is not applied (the form the loader would install), so that
``sgl-accel bench`` can time one decode layer's ``forward_decode`` original vs patched on
any device with ROCm flags emulated.
"""

from __future__ import annotations

import importlib
import math
import sys
import types
from dataclasses import dataclass, field
from typing import Callable, Optional

from . import Case, Comparison, compare, tolerance_for

PATCH_NAME = "nsa-decode-cat-skip"
MLA_MODULE = "sglang.srt.models.deepseek_common.attention_forward_methods.forward_mla"
BACKEND_MODULE = "sglang.srt.layers.attention.nsa_backend"
ATTN_UTILS_MODULE = "sglang.srt.layers.attention.utils"
MEMORY_POOL_MODULE = "sglang.srt.mem_cache.memory_pool"
BATCH_INFO_MODULE = "sglang.srt.model_executor.forward_batch_info"

KV_LORA_RANK = 512
ROPE_DIM = 64
HEAD_DIM = KV_LORA_RANK + ROPE_DIM  # 576, the absorbed q / latent KV row
V_HEAD_DIM = 128  # per-head output of w_vc (DeepSeek-V3 / GLM-5)
HIDDEN = 256  # o_proj output width (small: o_proj is outside the change)
PLATFORMS = ("rocm", "cuda", "musa")
MODES = ("decode", "idle", "extend")
IMPLS = ("tilelang", "aiter")
# Ops that only make views (no bytes written): the patch may change how many run.
VIEW_OPS = ("aten.view", "aten.slice", "aten._unsafe_view", "aten.alias", "aten.as_strided", "aten.select",
            "aten.unsqueeze", "aten.transpose", "aten.expand", "aten.reshape", "aten.t", "aten.detach")


@dataclass(frozen=True)
class Spec:
    batch: int = 4  # requests (decode: one token each)
    heads: int = 16  # q heads per rank
    impl: str = "tilelang"  # nsa_decode_backend: tilelang | aiter (prefill is tilelang)
    mode: str = "decode"  # decode | idle | extend
    platform: str = "rocm"  # rocm (gfx95 + aiter) | cuda | musa
    dtype: str = "bfloat16"
    topk: int = 2048  # NSA index_topk of DeepSeek-V3.2 / GLM-5; short contexts pad with -1
    extend_len: int = 3  # new tokens per request in extend mode
    llama_4_scaling: bool = False
    max_context: int = 48  # longest cached sequence
    is_neox: bool = False  # DeepSeek's MLA rope is GPT-J style
    seed: int = 0

    @property
    def tokens(self) -> int:
        if self.mode == "idle":
            return 0
        return self.batch * (self.extend_len if self.mode == "extend" else 1)

    @property
    def requests(self) -> int:
        return 0 if self.mode == "idle" else self.batch

    def label(self) -> str:
        extra = "-llama4" if self.llama_4_scaling else ""
        return f"{self.platform}-{self.mode}-{self.impl}-b{self.batch}-h{self.heads}-{self.dtype}{extra}"

    @property
    def removes_concat(self) -> bool:
        """Whether the patch removes one concatenation from this layer call."""
        return self.platform == "rocm" and self.mode == "decode" and self.impl in IMPLS and self.tokens > 0


def _torch():
    import torch

    return torch


def _dtype(name: str):
    return getattr(_torch(), name)


def _module(name: str):
    return sys.modules.get(name) or importlib.import_module(name)


# --------------------------------------------------------------------------- aiter model


def fused_qk_rope_cat_and_cache_mla_model(
    q_nope,
    q_pe,
    k_nope,
    k_pe,
    kv_cache,
    slot_mapping,
    pos,
    cos,
    sin,
    k_scale,
    is_neox,
    num_decode_toks_for_zeros=0,
    apply_scale=True,
    q_out=None,
    decode_q_pe_out=None,
    k_pe_out=None,
    q_out_dtype=None,
):
    """Plain-torch model of aiter's ``fused_qk_rope_cat_and_cache_mla``
    (aiter/ops/triton/fused_kv_cache.py, read in ROCm/aiter; its signature and return
    tuple are the ones sglang's forward_mla calls).

    Per token t and q head h: ``q_out[t, h] = cat(q_nope[t, h], rope(q_pe[t, h]))`` in
    ``q_out_dtype`` (default q_nope's), a new contiguous (T, H, d_nope + d_pe) tensor unless
    ``q_out`` is given. For every token with ``slot_mapping[t] >= 0`` and each KV head:
    ``kv_cache[slot, hk] = cat(k_nope, rope(k_pe)) / k_scale`` (scale only when
    ``k_scale`` is given and ``apply_scale``) and ``k_pe_out[t, hk] = rope(k_pe)``. The first
    ``num_decode_toks_for_zeros`` tokens also get ``decode_q_pe_out = rope(q_pe)`` and a
    zero q_nope block (returned fifth). ``rope``: ``x*cos + rot(x)*sin`` with cos/sin rows
    at ``pos[t]``; neox ``rot = cat(-x2, x1)``, GPT-J ``rot[2i] = -x[2i+1], rot[2i+1] = x[2i]``;
    cos/sin of width d_pe/2 are shared by both halves (neox) or by each pair (GPT-J).
    Arithmetic in fp32, cast on store [inferred: the Triton kernel computes in the loaded
    dtypes; exact rounding of the device kernel is not modelled]. k_pe_out rows of tokens
    with a negative slot are left as the kernel leaves them: not written (here: zeros).
    """
    torch = _torch()
    b, qh, d_nope = q_nope.shape
    _, _, d_pe = q_pe.shape
    bk, kh, dk_nope = k_nope.shape
    (b_slot,) = slot_mapping.shape
    if not (b_slot <= b and b == q_pe.shape[0] == bk == k_pe.shape[0]):
        raise ValueError("token counts of q_nope, q_pe, k_nope, k_pe, slot_mapping disagree")
    if qh % kh or kv_cache.shape[1] != kh or dk_nope + d_pe != kv_cache.shape[2]:
        raise ValueError(f"kv_cache {tuple(kv_cache.shape)} does not fit k_nope/k_pe")
    cos2 = cos.reshape(cos.shape[0], -1)
    sin2 = sin.reshape(sin.shape[0], -1)
    d_freq = cos2.shape[-1]
    if d_freq not in (d_pe, d_pe // 2):
        raise ValueError("cos/sin width must be d_pe or d_pe/2")
    c = cos2[pos.long()].float()
    s = sin2[pos.long()].float()
    if d_freq == d_pe // 2:
        c = torch.cat([c, c], -1) if is_neox else c.repeat_interleave(2, -1)
        s = torch.cat([s, s], -1) if is_neox else s.repeat_interleave(2, -1)
    c, s = c[:, None, :], s[:, None, :]

    def rope(x):
        x = x.float()
        if is_neox:
            x1, x2 = x[..., : d_pe // 2], x[..., d_pe // 2 :]
            rot = torch.cat([-x2, x1], -1)
        else:
            rot = torch.stack([-x[..., 1::2], x[..., 0::2]], -1).flatten(-2)
        return x * c + rot * s

    out_dtype = q_out_dtype if q_out_dtype is not None else q_nope.dtype
    if q_out is None:
        q_out = torch.empty((b, qh, d_nope + d_pe), dtype=out_dtype, device=q_nope.device)
    q_rot = rope(q_pe)
    q_out[..., :d_nope] = q_nope.to(q_out.dtype)
    q_out[..., d_nope:] = q_rot.to(q_out.dtype)
    if decode_q_pe_out is None:
        decode_q_pe_out = torch.empty((num_decode_toks_for_zeros, qh, d_pe), dtype=q_nope.dtype, device=q_nope.device)
    n = num_decode_toks_for_zeros
    if n:
        decode_q_pe_out[:n] = q_rot[:n].to(decode_q_pe_out.dtype)
    if k_pe_out is None:
        k_pe_out = torch.zeros((b, kh, d_pe), dtype=k_pe.dtype, device=k_pe.device)
    k_rot = rope(k_pe)
    scale = 1.0
    if k_scale is not None and apply_scale:
        scale = float(k_scale.reshape(-1)[0]) if isinstance(k_scale, torch.Tensor) else float(k_scale)
    rows = torch.nonzero(slot_mapping >= 0).flatten()
    if rows.numel():
        slots = slot_mapping[rows].long()
        k_pe_out[rows] = k_rot[rows].to(k_pe_out.dtype)
        kv_cache[slots, :, :dk_nope] = (k_nope[rows].float() / scale).to(kv_cache.dtype)
        kv_cache[slots, :, dk_nope:] = (k_rot[rows] / scale).to(kv_cache.dtype)
    if n > 0:
        zeros = torch.zeros((n, qh, dk_nope), dtype=q_nope.dtype, device=q_nope.device)
        return q_out, decode_q_pe_out, k_pe_out, kv_cache, zeros
    return q_out, decode_q_pe_out, k_pe_out, kv_cache


def rope_cos_sin(max_positions: int, dim: int = ROPE_DIM, base: float = 10000.0, device="cpu", dtype=None):
    """cos/sin tables of width dim/2 (what aiter's RotaryEmbedding hands the fused kernel)."""
    torch = _torch()
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    dtype = dtype or torch.float32
    return angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)


# --------------------------------------------------------------------------- the bed


class _ServerArgs:
    """The two fields of the global server args the fused-RoPE path reads."""

    def __init__(self, decode_impl: str, prefill_impl: str = "tilelang"):
        self.nsa_decode_backend = decode_impl
        self.nsa_prefill_backend = prefill_impl


class _OProj:
    """Stand-in for the layer's o_proj (a TP linear needing a process group): y = x Wᵀ."""

    def __init__(self, weight):
        self.weight = weight

    def __call__(self, x):
        return x.to(self.weight.dtype) @ self.weight.t(), None


def _set_mla_kv_buffer_model(kv_buffer, loc, cache_k_nope, cache_k_rope):
    """Plain-torch model of sglang's Triton ``set_mla_kv_buffer_triton`` (mem_cache/utils.py):
    ``kv_buffer[loc] = cat(k_nope, k_rope)`` row by row. Used on CPU only (the CUDA and MUSA
    paths write the KV cache through it)."""
    torch = _torch()
    kv_buffer[loc.long()] = torch.cat([cache_k_nope, cache_k_rope], dim=-1).to(kv_buffer.dtype)


@dataclass
class Bed:
    spec: Spec
    device: str
    layer: object  # DeepseekMLAForwardMixin subclass instance
    backend: object  # NativeSparseAttnBackend (object.__new__ + HIP attributes)
    forward_batch: object
    pool: object  # MLATokenToKVPool
    kv_initial: object  # KV buffer contents before any run
    inputs: dict  # forward_absorb_core arguments (the tensors are never handed to a run)
    fused: Callable  # aiter's fused kernel, or the model
    fused_outputs: list = field(default_factory=list)


_LAYER_CLASSES: dict = {}


def _layer_class():
    mixin = _module(MLA_MODULE).DeepseekMLAForwardMixin
    cls = _LAYER_CLASSES.get(mixin)
    if cls is None:
        # The release's own mixin: _skip_rope_for_nsa_tilelang_fused and
        # _fuse_rope_for_trtllm_mla are the real methods.
        cls = type("MLALayerForCases", (mixin,), {"__module__": __name__})
        _LAYER_CLASSES[mixin] = cls
    return cls


def _emulation(spec: Spec, bed: Optional[Bed]) -> list:
    """(module, attribute, value) triples that make the release's code take ``spec.platform``'s path."""
    fm = _module(MLA_MODULE)
    nb = _module(BACKEND_MODULE)
    rocm = spec.platform == "rocm"
    sets = [
        (fm, "_is_hip", rocm),
        (fm, "_is_cuda", spec.platform == "cuda"),
        (fm, "_use_aiter", rocm),
        (fm, "_is_gfx95_supported", rocm),
        (fm, "_use_aiter_gfx95", rocm),
        (fm, "get_global_server_args", lambda: _ServerArgs(spec.impl)),
        (nb, "_is_hip", rocm),
    ]
    if "_is_musa" in vars(fm):  # 0.5.11 has a MUSA branch after the attention call
        sets.append((fm, "_is_musa", spec.platform == "musa"))
    if rocm:
        # concat_mla_absorb_q_general is torch.cat on HIP (its CUDA kernel is not used there).
        sets.append((_module(ATTN_UTILS_MODULE), "_is_cuda", False))
        if bed is not None:
            sets.append((fm, "fused_qk_rope_cat_and_cache_mla", _recording(bed)))
    if bed is not None and bed.device == "cpu":
        pool_module = _module(MEMORY_POOL_MODULE)
        if "set_mla_kv_buffer_triton" in vars(pool_module):
            sets.append((pool_module, "set_mla_kv_buffer_triton", _set_mla_kv_buffer_model))
    return sets


def _recording(bed: Bed):
    def fused_qk_rope_cat_and_cache_mla(*args, **kwargs):
        result = bed.fused(*args, **kwargs)
        bed.fused_outputs.append(result[0])
        return result

    return fused_qk_rope_cat_and_cache_mla


def emulated(sets: list):
    """Set module attributes for the duration of the block; restore them afterwards."""
    from sgl_accel.seams import swapped

    return swapped(sets)


def _real_fused_kernel():
    """aiter's fused kernel when this machine really has it (ROCm with aiter), else None."""
    fm = _module(MLA_MODULE)
    fn = vars(fm).get("fused_qk_rope_cat_and_cache_mla")
    if fn is None:
        return None
    from sgl_accel.testing import standins

    return None if standins.is_placeholder(fn) or getattr(fn, standins.MARKER, False) else fn


def build(spec: Spec, device: str = "cpu") -> Bed:
    """Real objects and inputs for one layer call described by ``spec``."""
    torch = _torch()
    fm = _module(MLA_MODULE)
    nb = _module(BACKEND_MODULE)
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool

    bi = _module(BATCH_INFO_MODULE)
    if spec.platform not in PLATFORMS or spec.mode not in MODES or spec.impl not in IMPLS:
        raise ValueError(f"unknown spec {spec}")
    if spec.mode == "extend" and spec.impl != "tilelang":
        raise ValueError("extend runs the tilelang prefill impl (the aiter prefill kernel has no model)")
    dtype = _dtype(spec.dtype)
    gen = torch.Generator().manual_seed(spec.seed)  # index choices (CPU)
    dgen = torch.Generator(device=device).manual_seed(spec.seed)  # tensor values, drawn where they live

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=dgen, device=device) * scale).to(dtype)

    B, H, T = spec.requests, spec.heads, spec.tokens
    new = spec.extend_len if spec.mode == "extend" else 1
    # Cached lengths (before this step's tokens) between 1 and max_context, uneven.
    prior = torch.randint(1, spec.max_context + 1, (max(B, 1),), generator=gen)[:B]
    seq_lens = prior + new
    max_seq = int(seq_lens.max()) if B else 1
    pool_tokens = int(seq_lens.sum()) + 8
    pool = MLATokenToKVPool(pool_tokens, 1, dtype, KV_LORA_RANK, ROPE_DIM, 1, device, False)
    kv = pool.get_key_buffer(0)
    kv.copy_(randn(*kv.shape, scale=0.5))
    # Each request's tokens live in scattered slots (slot 0 is the pool's padding slot).
    perm = (torch.randperm(pool_tokens - 1, generator=gen) + 1)[: int(seq_lens.sum())]
    req_to_token = torch.zeros((max(B, 1), max_seq), dtype=torch.int32)
    start = 0
    for b in range(B):
        n = int(seq_lens[b])
        req_to_token[b, :n] = perm[start : start + n].to(torch.int32)
        start += n
    # This step's tokens: the last `new` positions of each request.
    out_cache_loc = torch.cat([req_to_token[b, int(prior[b]) : int(seq_lens[b])] for b in range(B)]) if B else torch.zeros(0, dtype=torch.int32)
    positions = torch.cat([torch.arange(int(prior[b]), int(seq_lens[b])) for b in range(B)]) if B else torch.zeros(0, dtype=torch.int64)
    token_req = torch.repeat_interleave(torch.arange(B), new) if B else torch.zeros(0, dtype=torch.int64)
    # Top-k selection per token (fused topk: entries are KV slots), causal, -1 padded.
    topk_indices = torch.full((T, spec.topk), -1, dtype=torch.int32)
    for t in range(T):
        b, p = int(token_req[t]), int(positions[t])
        visible = req_to_token[b, : p + 1]
        k = min(spec.topk, visible.numel())
        choice = torch.randperm(visible.numel(), generator=gen)[:k]
        topk_indices[t, :k] = visible[choice]

    layer_cls = _layer_class()
    layer = layer_cls.__new__(layer_cls)
    layer.current_attention_backend = "nsa"
    layer.kv_cache_dtype = "auto"
    layer.kv_lora_rank = KV_LORA_RANK
    layer.qk_rope_head_dim = ROPE_DIM
    layer.num_local_heads = H
    layer.v_head_dim = V_HEAD_DIM
    layer.use_deep_gemm_bmm = False
    layer.next_skip_topk = None
    scaling = (192 ** -0.5)  # qk_nope 128 + rope 64, as DeepSeek-V3 scales
    layer.attn_mqa = RadixAttention(H, HEAD_DIM, scaling, num_kv_heads=1, layer_id=0, v_head_dim=KV_LORA_RANK)
    cos, sin = rope_cos_sin(max_seq + 1, device=device, dtype=dtype)
    layer.rotary_emb = types.SimpleNamespace(cos_cache=cos, sin_cache=sin, is_neox_style=spec.is_neox)
    layer.w_kc = randn(H, 128, KV_LORA_RANK, scale=0.05)
    layer.w_vc = randn(H, KV_LORA_RANK, V_HEAD_DIM, scale=0.05)
    layer.w_scale = 1.0
    layer.w_scale_v = None
    layer.o_proj = _OProj(randn(HIDDEN, H * V_HEAD_DIM, scale=0.02))

    backend = object.__new__(nb.NativeSparseAttnBackend)
    backend.device = device
    backend.real_page_size = 1
    backend.use_mha = False
    backend.nsa_kv_cache_store_fp8 = False
    backend.nsa_index_topk = spec.topk
    backend.nsa_decode_impl = spec.impl
    backend.nsa_prefill_impl = "tilelang"
    backend.num_q_heads = H
    backend.kv_lora_rank = KV_LORA_RANK
    backend.qk_rope_head_dim = ROPE_DIM
    # What __init__ allocates on HIP for the aiter decode kernel.
    backend.kv_indptr = torch.zeros((max(B, 1) + 1,), dtype=torch.int32, device=device)
    backend.kv_indices = torch.zeros(max(B, 1) * spec.topk, dtype=torch.int32, device=device)
    backend.need_pad_heads = H < 16
    backend.head_repeat_factor = 16 // H if H < 16 else 1

    seq32 = seq_lens.to(torch.int32)
    clipped = seq32.clamp(max=spec.topk)
    cu = lambda x: torch.nn.functional.pad(torch.cumsum(x, 0, dtype=torch.int32), (1, 0))  # noqa: E731
    page_table = req_to_token[:B, :max_seq].to(device)
    if spec.mode == "extend":
        cu_q = cu(torch.full((B,), new, dtype=torch.int32))
        expanded = torch.cat([torch.arange(int(prior[b]) + 1, int(seq_lens[b]) + 1, dtype=torch.int32) for b in range(B)])
        page_table_1 = page_table[token_req]
    else:
        cu_q = torch.arange(B + 1, dtype=torch.int32)
        expanded = seq32
        page_table_1 = page_table
    backend.forward_metadata = nb.NSAMetadata(
        page_size=1,
        cache_seqlens_int32=seq32.to(device),
        max_seq_len_q=new,
        max_seq_len_k=max_seq,
        cu_seqlens_q=cu_q.to(device),
        cu_seqlens_k=cu(seq32).to(device),
        page_table_1=page_table_1,
        real_page_table=page_table_1,
        nsa_cache_seqlens_int32=clipped.to(device),
        nsa_cu_seqlens_q=torch.arange(T + 1, dtype=torch.int32, device=device),
        nsa_cu_seqlens_k=cu(clipped).to(device),
        nsa_extend_seq_lens_list=[new] * B,
        nsa_seqlens_expanded=expanded.to(device),
        seq_lens_sum=int(seq_lens.sum()),
    )

    mode = {"decode": bi.ForwardMode.DECODE, "idle": bi.ForwardMode.IDLE, "extend": bi.ForwardMode.EXTEND}[spec.mode]
    fb = bi.ForwardBatch(
        forward_mode=mode,
        batch_size=B,
        input_ids=torch.zeros(T, dtype=torch.int64, device=device),
        req_pool_indices=torch.arange(B, dtype=torch.int64, device=device),
        seq_lens=seq_lens.to(device),
        out_cache_loc=out_cache_loc.to(device=device, dtype=torch.int64),
        seq_lens_sum=int(seq_lens.sum()),
        seq_lens_cpu=seq_lens,
        positions=positions.to(device),
    )
    fb.token_to_kv_pool = pool
    fb.attn_backend = backend
    if spec.mode == "extend":
        fb.extend_seq_lens = torch.full((B,), new, dtype=torch.int32, device=device)
        fb.extend_seq_lens_cpu = [new] * B
        fb.extend_prefix_lens_cpu = [int(p) for p in prior]
        fb.extend_num_tokens = T

    # forward_absorb_core's inputs, as forward_absorb_prepare hands them over:
    # q_nope_out is the (T, H, 512) transpose of a (H, T, 512) bmm result.
    q_nope_base = randn(H, T, KV_LORA_RANK, scale=0.5)
    inputs = dict(
        q_nope_base=q_nope_base,
        q_pe=randn(T, H, ROPE_DIM),
        k_nope=randn(T, 1, KV_LORA_RANK, scale=0.5),
        k_pe=randn(T, 1, ROPE_DIM),
        positions=positions.to(device),
        topk_indices=topk_indices.to(device),
    )
    if spec.llama_4_scaling:
        from sglang.srt.models.deepseek_common.utils import _get_llama_4_scaling

        # Positions well past the original window, so the scale differs from 1.
        inputs["llama_4_scaling"] = _get_llama_4_scaling(8, 0.1, positions.to(device).float() + 64)
    else:
        inputs["llama_4_scaling"] = None
    fused = _real_fused_kernel() or fused_qk_rope_cat_and_cache_mla_model
    return Bed(spec, device, layer, backend, fb, pool, kv.clone(), inputs, fused)


# --------------------------------------------------------------------------- running


@dataclass
class Run:
    output: object
    kv: object  # the KV buffer after the call
    entry_q: list  # q tensors as received by the decode entry points (tilelang / aiter), in order
    entries: list  # their names
    concat_q: list  # outputs of concat_mla_absorb_q_general calls
    q_cat: object  # what the fused kernel returned as q (ROCm), or None
    counter: object  # OpCounter of the whole layer call


def _fresh_inputs(bed: Bed) -> dict:
    x = {k: (v.clone() if hasattr(v, "clone") else v) for k, v in bed.inputs.items()}
    x["q_nope_out"] = x.pop("q_nope_base").transpose(0, 1)
    return x


def run(bed: Bed, absorb: Callable, decode: Callable) -> Run:
    """One layer call: ``absorb`` as forward_absorb_core, ``decode`` as the backend's forward_decode."""
    from sgl_accel.testing.kernels.rocm import DecodeRecorder
    from sgl_accel.testing.opcount import OpCounter

    bed.pool.get_key_buffer(0).copy_(bed.kv_initial)
    bed.fused_outputs.clear()
    x = _fresh_inputs(bed)
    backend = bed.backend
    # An instance attribute shadows the class's method: this run's forward_decode,
    # whatever the class currently holds.
    backend.forward_decode = types.MethodType(decode, backend)
    recorder = DecodeRecorder()
    try:
        with emulated(_emulation(bed.spec, bed)), recorder.installed(_module(BACKEND_MODULE)):
            with OpCounter() as counter:
                out = absorb(
                    bed.layer,
                    x["q_pe"],
                    x["k_pe"],
                    x["q_nope_out"],
                    x["k_nope"],
                    bed.forward_batch,
                    None,
                    x["positions"],
                    x["topk_indices"],
                    x["llama_4_scaling"],
                )
    finally:
        del backend.forward_decode
    calls = recorder.decode_calls
    q_cat = bed.fused_outputs[-1] if bed.fused_outputs else None
    return Run(
        output=out,
        kv=bed.pool.get_key_buffer(0).clone(),
        entry_q=[c.q for c in calls],
        entries=[c.entry for c in calls],
        concat_q=[c.q for c in recorder.concat_calls],
        q_cat=q_cat,
        counter=counter,
    )


def functions() -> dict:
    """{"absorb": (original, patched), "decode": (original, patched)}.

    From the installed classes when the patch is applied; otherwise the patched form the
    loader would install, built from the installed source (the classes stay untouched).
    """
    fm = _module(MLA_MODULE)
    nb = _module(BACKEND_MODULE)
    owners = {"absorb": (fm.DeepseekMLAForwardMixin, "forward_absorb_core"), "decode": (nb.NativeSparseAttnBackend, "forward_decode")}
    current = {k: owner.__dict__[attr] for k, (owner, attr) in owners.items()}
    originals = {k: getattr(f, "__sgl_accel_original__", None) for k, f in current.items()}
    if all(o is not None for o in originals.values()):
        return {k: (originals[k], current[k]) for k in owners}
    if any(o is not None for o in originals.values()):
        raise RuntimeError(f"{PATCH_NAME}: only some targets are patched")
    return {k: (current[k], p) for k, p in build_patched().items()}


def build_patched() -> dict:
    """The patched functions, compiled as the loader compiles them, not installed anywhere."""
    from sgl_accel.seams import patched_forms

    # In the order the patch declares its targets (wherever this release keeps them).
    forms = patched_forms(PATCH_NAME)
    return {key: patched for key, (_, patched) in zip(("absorb", "decode"), forms.values())}


# --------------------------------------------------------------------------- comparing


def concat_bytes(spec: Spec) -> int:
    """Bytes of the one concatenation the patch removes per decode layer: tokens x heads x 576 x element size."""
    return spec.tokens * spec.heads * HEAD_DIM * _torch().empty(0, dtype=_dtype(spec.dtype)).element_size()


def _bytes_view(t):
    torch = _torch()
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _shares(a, b) -> bool:
    return a is not None and b is not None and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _flag(what: str, ok: bool, note: str = "") -> Comparison:
    return Comparison(what, 0.0 if ok else math.inf, 0.0, exact=True, note=note)


def op_delta(original: Run, patched: Run) -> dict:
    """What the patched call ran less than the original (positive = fewer)."""
    o, p = original.counter, patched.counter
    ops = {op: o.ops.get(op, 0) - p.ops.get(op, 0) for op in set(o.ops) | set(p.ops)}
    return {
        "ops": {op: d for op, d in ops.items() if d},
        "allocations": o.allocations - p.allocations,
        "bytes_allocated": o.bytes_allocated - p.bytes_allocated,
        "bytes_written": o.bytes_written - p.bytes_written,
    }


def evaluate(spec: Spec, device: str = "cpu", fns: Optional[dict] = None) -> tuple:
    """(comparisons, original Run, patched Run) for ``spec``."""
    fns = fns or functions()
    bed = build(spec, device)
    (absorb_o, absorb_p), (decode_o, decode_p) = fns["absorb"], fns["decode"]
    original = run(bed, absorb_o, decode_o)
    patched = run(bed, absorb_p, decode_p)
    tol = tolerance_for(_dtype(spec.dtype))
    out = [
        compare("layer output vs original", patched.output, original.output, tol),
        compare("KV cache after the call vs original", patched.kv, original.kv, exact=True),
        _flag("same decode entry points called", patched.entries == original.entries, f"{patched.entries} vs {original.entries}"),
    ]
    for i, (qp, qo) in enumerate(zip(patched.entry_q, original.entry_q)):
        same_shape = tuple(qp.shape) == tuple(qo.shape) and qp.dtype == qo.dtype
        out.append(_flag(f"q at entry {i} ({patched.entries[i]}): shape and dtype", same_shape, f"{tuple(qp.shape)} vs {tuple(qo.shape)}"))
        if same_shape:
            out.append(compare(f"q at entry {i} ({patched.entries[i]}): bytes", _bytes_view(qp), _bytes_view(qo), exact=True))
    if spec.platform == "rocm" and spec.tokens:
        out.append(compare("q_cat after the call (llama_4_scaling in place) vs original", patched.q_cat, original.q_cat, exact=True))
    delta = op_delta(original, patched)
    expected_cats = 1 if spec.removes_concat else 0
    expected_bytes = concat_bytes(spec) if spec.removes_concat else 0
    out.append(_flag("aten.cat calls removed", delta["ops"].get("aten.cat.default", 0) == expected_cats, f"{delta['ops']}"))
    out.append(_flag("bytes allocated removed", delta["bytes_allocated"] == expected_bytes, f"{delta['bytes_allocated']} vs {expected_bytes}"))
    out.append(_flag("bytes written removed", delta["bytes_written"] == expected_bytes, f"{delta['bytes_written']} vs {expected_bytes}"))
    others = [op for op in delta["ops"] if op != "aten.cat.default" and op.rsplit(".", 1)[0] not in VIEW_OPS]
    out.append(_flag("no other op changes (views aside)", not others, f"{others}"))
    if spec.removes_concat:
        # A q with more heads than the layer is aiter's head padding (repeat_interleave, 0.5.11+): a copy by design.
        unpadded = [q for q in patched.entry_q if q.shape[1] == spec.heads]
        shared = bool(patched.entry_q) and all(_shares(q, patched.q_cat) for q in unpadded)
        out.append(_flag("patched entry q is a view of q_cat", shared, f"{len(unpadded)} unpadded entry q"))
    return out, original, patched


def _case(name: str, description: str, **kwargs) -> Case:
    def run_case(seed: int) -> list:
        return evaluate(Spec(seed=seed, **kwargs))[0]

    return Case(PATCH_NAME, name, run_case, description)


CASES: list = [
    _case("rocm-decode-tilelang", "ROCm gfx95 decode, tilelang: q_cat reaches the kernel as a view, one cat fewer", batch=4, heads=16),
    _case("rocm-decode-aiter", "ROCm gfx95 decode, aiter mla_decode_fwd: one torch.cat fewer", batch=3, heads=16, impl="aiter"),
    _case("rocm-decode-aiter-padded-heads", "aiter decode with 8 heads per rank (padded to 16 by repeat_interleave)", batch=2, heads=8, impl="aiter"),
    _case("rocm-decode-llama4", "decode with llama_4_scaling: scaled in place on the absorbed half of q_cat", batch=3, heads=16, llama_4_scaling=True),
    _case("rocm-idle", "IDLE batch: no tokens, nothing changes", batch=2, heads=16, mode="idle"),
    _case("rocm-extend", "prefill/extend keeps the split form (tilelang prefill): unchanged", batch=2, heads=16, mode="extend", llama_4_scaling=True),
    _case("cuda-decode-tilelang", "CUDA (no aiter): forward_absorb_core's split path and the re-concatenation unchanged", batch=3, heads=16, platform="cuda"),
    _case("musa-decode-tilelang", "MUSA: unchanged", batch=2, heads=16, platform="musa"),
]


# --------------------------------------------------------------------------- bench


def decode_pair(batch: int, heads: int, dtype: str = "bfloat16", device: str = "cpu", impl: str = "tilelang",
                topk: int = 2048, max_context: int = 4096, seed: int = 0) -> tuple:
    """(original, patched): zero-argument callables, each one decode layer's ``forward_decode``
    as forward_absorb_core hands it the fused q with ROCm gfx95 flags emulated.

    The original gets what the release's forward_absorb_core passes: ``q_cat[..., :512]`` with
    ``q_rope=q_cat[..., 512:]`` (the two slices are taken in the call, as there); the patched
    one gets ``q_cat`` with ``q_rope=None``. Both end in the same entry point (the
    sparse-MLA reference of the test bed unless this machine has the real kernels), so the
    difference between them is the concatenation (a fresh batch x heads x 576 tensor).
    Each call returns the attention output.
    """
    from sgl_accel.testing.kernels.rocm import DecodeRecorder

    spec = Spec(batch=batch, heads=heads, impl=impl, dtype=dtype, topk=topk, max_context=max_context, seed=seed)
    bed = build(spec, device)
    fns = functions()
    decode_o, decode_p = fns["decode"]
    torch = _torch()
    gen = torch.Generator().manual_seed(seed + 1)
    q_cat = (torch.randn(spec.tokens, heads, HEAD_DIM, generator=gen) * 0.5).to(device=device, dtype=_dtype(dtype))
    k_rope = torch.zeros(spec.tokens, 1, ROPE_DIM, device=device, dtype=_dtype(dtype))
    topk_indices = bed.inputs["topk_indices"]
    layer, fb, backend = bed.layer.attn_mqa, bed.forward_batch, bed.backend
    sets = _emulation(spec, None)
    recorder = DecodeRecorder()

    def call(fn, split: bool):
        with emulated(sets), recorder.installed(_module(BACKEND_MODULE)):
            try:
                if split:
                    return fn(backend, q_cat[..., :KV_LORA_RANK], None, None, layer, fb, save_kv_cache=False,
                              q_rope=q_cat[..., KV_LORA_RANK:], k_rope=k_rope, topk_indices=topk_indices)
                return fn(backend, q_cat, None, None, layer, fb, save_kv_cache=False, q_rope=None, k_rope=k_rope,
                          topk_indices=topk_indices)
            finally:
                recorder.clear()  # the recorder keeps every q it sees; a bench loop must not

    return (lambda: call(decode_o, True)), (lambda: call(decode_p, False))


def _bench_case(batch: int, heads: int, impl: str = "tilelang"):
    from sgl_accel._bench import BenchCase

    def setup(device: str):
        return decode_pair(batch, heads, device=device, impl=impl, topk=256, max_context=1024)

    return BenchCase(PATCH_NAME, f"forward_decode {impl} b{batch} h{heads} bf16", setup,
                     f"one decode layer, {batch} tokens x {heads} heads x 576, ROCm flags emulated, top-k 256")


def _bench_cases() -> list:
    try:
        return [_bench_case(1, 16), _bench_case(32, 64), _bench_case(256, 128), _bench_case(16, 128, "aiter")]
    except ImportError:  # an sgl_accel without the bench module
        return []


BENCH: list = _bench_cases()
