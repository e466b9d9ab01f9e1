"""Equivalence cases for ``ascend-dflash`` (DFlash speculative decoding on Ascend).

Every case builds real sglang objects of the installed release: a
``DFlashDraftModel`` (real ``DFlashAttention`` / ``QKVParallelLinear`` / ``RMSNorm``
/ rotary layers, random weights), the real ``AscendAttnBackend`` methods, the real
``NPUGraphRunner.replay`` and ``DFlashWorker`` methods. Stand-ins are used only
for server-side objects (model runner, target worker, NPU graph, forward batch as
a namespace) and, in tests, for the accelerator kernels (sgl_accel.testing).

What they check (the patch must be applied; the original functions come from
``__sgl_accel_original__``):

* ``qkv-*``: the fused ``split_qkv_rmsnorm_rope`` path of ``DFlashAttention.forward``
  against the original unfused path (split, ``apply_qk_norm``, rotary), q/k/v and
  layer output, through several layers sharing one rotary module, over a sequence
  of forwards: new positions, positions rewritten in place, and a forward that
  reaches a layer other than 0 first. The rotary rows must be prepared once per
  forward. Positions are non-monotonic (requests at unrelated offsets, shuffled).
* ``fallback-*``: configurations the kernel cannot express (interleaved RoPE) keep
  the original computation bit for bit.
* ``append-*``: ``DFlashWorker._append_target_hidden_sequential`` writes the same
  context K/V into the draft KV pool as the original.
* ``mtp-*``: ``AscendAttnBackend.forward_mtp`` (paged TND FIA, test-bed kernel on
  CPU): an ENCODER_ONLY layer equals non-causal attention computed directly with
  SDPA over each request's whole KV; a causal layer equals the original exactly.
* ``draft-step``: one DFlash draft step, context materialisation + block forward
  of the whole draft model on the Ascend attention backend, against the original
  model with an SDPA oracle backend (non-causal over context + block).
* ``worker-backend-*``: ``DFlashWorker.__init__`` hands "ascend" to the draft runner.
* ``replay-embeds``: ``NPUGraphRunner.replay`` (attention init skipped, as the
  DFlash draft does) has the draft block's input embeddings in the graph buffer
  when the graph replays; other runners' buffers are left alone.

Hardware flags and runtime: every case runs inside ``emulation()``, which puts
sglang's rotary module in Ascend mode (``sglang.srt.layers.rotary_embedding.base._is_npu``,
read when a ``RotaryEmbedding`` is built; unset, CPU construction imports vLLM's
kernel) and provides global server args and a TP-1 parallel state when the
process has none, all restored on exit. So a case is self-contained: the tests
and ``sgl-accel verify --emulate`` run it the same way. The generic
``MultiPlatformOp`` dispatch stays native, so the unfused reference path runs
torch code. KV pools are the generic ``MHATokenToKVPool``: its per-layer buffer
``[slots, heads, head_dim]`` views as the ``[pages, page_size, heads * head_dim]``
paged layout FIA reads, and its ``set_kv_buffer`` is plain indexing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import socket
import types
from dataclasses import dataclass
from typing import Optional

from . import Case, Comparison, compare, tolerance_for

PATCH_NAME = "ascend-dflash"
DFLASH_MODULE = "sglang.srt.models.dflash"
WORKER_MODULE = "sglang.srt.speculative.dflash_worker"
GRAPH_RUNNER_MODULE = "sglang.srt.hardware_backend.npu.graph_runner.npu_graph_runner"
BACKEND_MODULE = "sglang.srt.hardware_backend.npu.attention.ascend_backend"


def _module(name: str):
    return importlib.import_module(name)


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def scaled_tolerance(reference, dtype) -> float:
    """``tolerance_for(dtype)`` relative to the reference's magnitude: a rounding
    step of bf16 at |x| in [4, 8) is already 0.03, above the O(1) tolerance."""
    return tolerance_for(dtype) * max(1.0, float(reference.detach().abs().max()) if reference.numel() else 1.0)


def close(what: str, actual, expected, dtype) -> Comparison:
    return compare(what, actual, expected, scaled_tolerance(expected, dtype))


# --------------------------------------------------------------------------- runtime


@contextlib.contextmanager
def runtime():
    """What building sglang layers needs in a bare process, for the duration of the block.

    Global server args (the rotary and linear layers read them) and sglang's
    parallel state with tensor-parallel size 1 on a one-process gloo group.
    Existing state (a server process, an enclosing block) is used as it is; what
    this block set up is torn down on exit, so nested blocks are cheap and the
    process is left as it was found.
    """
    server_args = _module("sglang.srt.server_args")
    ps = _module("sglang.srt.distributed.parallel_state")
    import torch.distributed as dist

    set_args = getattr(server_args, "_global_server_args", None) is None
    set_parallel = not ps.model_parallel_is_initialized()
    set_dist = set_parallel and not dist.is_initialized()
    try:
        if set_args:
            server_args.set_global_server_args_for_scheduler(default_server_args())
        if set_dist:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            ps.init_distributed_environment(
                world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}", local_rank=0, backend="gloo"
            )
        if set_parallel:
            ps.initialize_model_parallel(1, backend="gloo")
        yield
    finally:
        if set_parallel and ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        if set_dist:
            ps.destroy_distributed_environment()
        if set_args:
            server_args._global_server_args = None


ROTARY_MODULE = "sglang.srt.layers.rotary_embedding.base"
ROPE_FACTORY_MODULE = "sglang.srt.layers.rotary_embedding.factory"


@contextlib.contextmanager
def ascend_flags():
    """sglang's rotary module in Ascend mode for the duration of the block.

    ``RotaryEmbedding.__init__`` picks its kernel from the module's platform flags:
    off CUDA/CPU/XPU/NPU/MUSA/MPS it imports vLLM's ``rotary_embedding``. With
    ``_is_npu`` set it keeps the native path, as on Ascend. Rotary modules built
    meanwhile are dropped from ``get_rope``'s cache on exit: they were built for
    the emulated platform (and carry the patch's per-forward cos/sin rows).
    """
    rotary = _module(ROTARY_MODULE)
    factory = _module(ROPE_FACTORY_MODULE)
    cache = getattr(factory, "_ROPE_DICT", None)
    cached = set(cache) if isinstance(cache, dict) else None
    saved = rotary.__dict__["_is_npu"]
    rotary._is_npu = True
    try:
        yield
    finally:
        rotary._is_npu = saved
        if cached is not None:
            for key in [k for k in cache if k not in cached]:
                del cache[key]


@contextlib.contextmanager
def emulation():
    """Everything the cases need from the process: Ascend flags and the runtime.

    Every case runs inside it (``CASES``); callers that use the builders directly
    (tests) hold it around their own work. Re-entrant; restores on exit.
    """
    with ascend_flags(), runtime():
        yield


def _self_contained(run):
    """``run(seed)`` inside ``emulation()``: what ``sgl-accel verify`` calls."""

    def case(seed):
        with emulation():
            return run(seed)

    return case


def default_server_args():
    """A ``ServerArgs`` holding its declared defaults.

    ``ServerArgs.__post_init__`` resolves the device and loads the model's HF config;
    the layers built here only read plain fields (``rl_on_policy_target``,
    attention backend names), so the instance is made without it.
    """
    cls = _module("sglang.srt.server_args").ServerArgs
    args = object.__new__(cls)
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = None
        object.__setattr__(args, f.name, value)
    args.model_path = "sgl-accel-dflash-case"
    return args


def functions(owner, name: str):
    """(patched, original) plain functions of ``owner.name``; raises if not patched."""
    current = owner.__dict__[name]
    original = getattr(current, "__sgl_accel_original__", None)
    if original is None:
        raise RuntimeError(f"{PATCH_NAME} is not applied ({owner.__name__}.{name} is the installed function)")
    return current, original


@contextlib.contextmanager
def installed(owner, name: str, function):
    """Temporarily put ``function`` on ``owner`` (to run a whole model on one variant)."""
    saved = owner.__dict__[name]
    setattr(owner, name, function)
    try:
        yield
    finally:
        setattr(owner, name, saved)


# --------------------------------------------------------------------------- draft model


@dataclass(frozen=True)
class Shape:
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 64
    hidden_size: int = 128
    num_layers: int = 3
    block_size: int = 4
    norm_bias: str = "none"  # "none", "both", "q", "k": which q/k norms carry a bias
    attention_bias: bool = False  # bias of qkv_proj / o_proj
    neox: bool = True
    dtype: str = "bfloat16"
    rope_theta: float = 10000.0


def draft_config(shape: Shape):
    """A DFlash draft config as the HF config object the model reads."""
    return types.SimpleNamespace(
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        num_hidden_layers=shape.num_layers,
        intermediate_size=2 * shape.hidden_size,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        rope_theta=shape.rope_theta,
        rope_scaling=None,
        rope_is_neox_style=shape.neox,
        max_position_embeddings=4096,
        attention_bias=shape.attention_bias,
        block_size=shape.block_size,
        num_target_layers=2 * shape.num_layers,
    )


_BIASED_NORM = None


def biased_rms_norm_class():
    """An RMSNorm whose output gets ``+ bias``: a q/k norm carrying a bias, which the
    kernel models with q_bias/k_bias (sglang's own RMSNorm has none)."""
    global _BIASED_NORM
    if _BIASED_NORM is None:
        RMSNorm = _module("sglang.srt.layers.layernorm").RMSNorm

        class BiasedRMSNorm(RMSNorm):
            def forward(self, x, *args, **kwargs):
                return super().forward(x, *args, **kwargs) + self.bias

        _BIASED_NORM = BiasedRMSNorm
    return _BIASED_NORM


def build_model(shape: Shape, seed: int):
    """A real ``DFlashDraftModel`` with deterministic random weights."""
    import torch

    dflash = _module(DFLASH_MODULE)
    dtype = _dtype(shape.dtype)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters and the rotary cache take the model dtype
    try:
        with emulation():  # no-op inside a case; keeps a direct call from leaking state
            model = dflash.DFlashDraftModel(draft_config(shape))
    finally:
        torch.set_default_dtype(saved)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                value = 1.0 + 0.25 * torch.randn(param.shape, generator=gen)
            elif name.endswith("bias"):
                value = 0.2 * torch.randn(param.shape, generator=gen)
            else:
                value = torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[-1])
            param.copy_(value.to(param.dtype))
        if shape.norm_bias != "none":
            cls = biased_rms_norm_class()
            which = {"both": ("q_norm", "k_norm"), "q": ("q_norm",), "k": ("k_norm",)}[shape.norm_bias]
            for layer in model.layers:
                for attr in which:
                    norm = getattr(layer.self_attn, attr)
                    norm.__class__ = cls
                    bias = 0.5 * torch.randn(shape.head_dim, generator=gen)
                    norm.bias = torch.nn.Parameter(bias.to(norm.weight.dtype), requires_grad=False)
    return model.eval()


def block_positions(gen, num_requests: int, block: int, shuffle: bool = False):
    """Positions of ``num_requests`` draft blocks at unrelated offsets (non-monotonic)."""
    import torch

    starts = torch.randint(0, 3000, (num_requests,), generator=gen)
    positions = (starts[:, None] + torch.arange(block)[None, :]).reshape(-1)
    if shuffle:
        positions = positions[torch.randperm(positions.numel(), generator=gen)]
    return positions.to(torch.int64)


def _block_attention(q, k, v, layer, block: int):
    """Non-causal attention inside each request's block of ``block`` tokens."""
    import torch.nn.functional as F

    t = q.shape[0]
    hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
    qb = q.reshape(t // block, block, hq, d).transpose(1, 2).float()
    kb = k.reshape(t // block, block, hkv, d).transpose(1, 2).float()
    vb = v.reshape(t // block, block, hkv, d).transpose(1, 2).float()
    out = F.scaled_dot_product_attention(qb, kb, vb, scale=layer.scaling, enable_gqa=True)
    return out.transpose(1, 2).reshape(t, hq * d).to(q.dtype)


class RecordingBackend:
    """Stand-in attention backend: records q/k/v per layer, answers with block attention."""

    def __init__(self, block: int):
        self.block = block
        self.calls = []

    def forward(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self.calls.append((layer.layer_id, q.detach().clone(), k.detach().clone(), v.detach().clone()))
        return _block_attention(q, k, v, layer, self.block)


def _verify_mode():
    return _module("sglang.srt.model_executor.forward_batch_info").ForwardMode.TARGET_VERIFY


@contextlib.contextmanager
def counting_cos_sin(rope):
    """Count ``get_cos_sin_with_position`` calls on one rotary module."""
    calls = []
    bound = rope.get_cos_sin_with_position

    def counted(positions):
        calls.append(positions)
        return bound(positions)

    rope.__dict__["get_cos_sin_with_position"] = counted
    try:
        yield calls
    finally:
        rope.__dict__.pop("get_cos_sin_with_position", None)


def _run_layers(forward, attns, positions, hiddens, block):
    backend = RecordingBackend(block)
    batch = types.SimpleNamespace(forward_mode=_verify_mode(), attn_backend=backend)
    outputs = [forward(attn, positions, hidden, batch) for attn, hidden in zip(attns, hiddens)]
    return backend.calls, outputs


def run_qkv(shape: Shape, seed: int, num_requests: int = 3, expect_fused: bool = True) -> list:
    """Patched vs original ``DFlashAttention.forward`` over a sequence of forwards."""
    import torch

    dflash = _module(DFLASH_MODULE)
    patched, original = functions(dflash.DFlashAttention, "forward")
    model = build_model(shape, seed)
    attns = [layer.self_attn for layer in model.layers]
    rope = attns[0].rotary_emb
    gen = torch.Generator().manual_seed(seed + 1)
    dtype = _dtype(shape.dtype)
    tokens = num_requests * shape.block_size
    exact = not expect_fused

    def hiddens():
        return [torch.randn(tokens, shape.hidden_size, generator=gen).to(dtype) for _ in attns]

    reused = block_positions(gen, num_requests, shape.block_size)
    steps = [
        ("forward 1", block_positions(gen, num_requests, shape.block_size), range(len(attns))),
        ("forward 2 (new positions)", block_positions(gen, num_requests, shape.block_size, shuffle=True), range(len(attns))),
        ("forward 3 (positions buffer reused)", reused, range(len(attns))),
        ("forward 4 (same buffer rewritten in place)", reused, range(len(attns))),
        ("forward 5 (a later layer sees new positions first)", block_positions(gen, num_requests, shape.block_size), [len(attns) - 1]),
    ]
    results = []
    with torch.no_grad():
        for label, positions, which in steps:
            if label.startswith("forward 4"):
                positions.copy_(block_positions(gen, num_requests, shape.block_size, shuffle=True))
            layers = [attns[i] for i in which]
            inputs = hiddens()
            with counting_cos_sin(rope) as prepared:
                got, out = _run_layers(patched, layers, positions, inputs, shape.block_size)
            want, ref = _run_layers(original, layers, positions, inputs, shape.block_size)
            for (lid, q, k, v), (_, q0, k0, v0), o, o0 in zip(got, want, out, ref):
                for name, a, b in (("q", q, q0), ("k", k, k0), ("v", v, v0), ("output", o, o0)):
                    what = f"{label}: layer {lid} {name}"
                    results.append(compare(what, a, b, exact=True) if exact else close(what, a, b, dtype))
            if expect_fused:
                # One preparation per forward however many layers share the rotary module.
                results.append(
                    Comparison(f"{label}: cos/sin prepared {len(prepared)} time(s)", abs(len(prepared) - 1.0), 0.0, exact=True)
                )
    return results


# --------------------------------------------------------------------------- KV pool, Ascend backend


def make_pool(shape: Shape, slots: int, page_size: int, seed: int, layers: Optional[int] = None):
    """A real ``MHATokenToKVPool`` filled with large random values (reads of slots
    that were never written show up in outputs)."""
    import torch

    memory_pool = _module("sglang.srt.mem_cache.memory_pool")
    pool = memory_pool.MHATokenToKVPool(
        size=slots,
        page_size=page_size,
        dtype=_dtype(shape.dtype),
        head_num=shape.num_kv_heads,
        head_dim=shape.head_dim,
        layer_num=layers if layers is not None else shape.num_layers,
        device="cpu",
        enable_memory_saver=False,
        enable_alt_stream=False,
    )
    gen = torch.Generator().manual_seed(seed)
    for buffers in (pool.k_buffer, pool.v_buffer):
        for buf in buffers:
            buf.copy_((40 * torch.randn(buf.shape, generator=gen)).to(buf.dtype))
    return pool


def pool_state(pool) -> list:
    return [b.clone() for b in list(pool.k_buffer) + list(pool.v_buffer)]


def make_backend(page_size: int, draft_tokens: int):
    """A real ``AscendAttnBackend`` with what ``init_forward_metadata`` / ``forward_mtp`` read.

    ``__init__`` needs an NPU device and a ModelRunner, so the instance is made with
    ``object.__new__``; the MTP mask comes from the backend's own mask builder.
    """
    backend_mod = _module(BACKEND_MODULE)
    backend = object.__new__(backend_mod.AscendAttnBackend)
    backend.forward_metadata = None
    backend.device = "cpu"
    backend.page_size = page_size
    backend.graph_mode = False
    backend.use_mla = False
    backend.is_dllm_model = False
    backend.is_hybrid_swa = False
    backend.use_sliding_window_kv_pool = False
    backend.speculative_num_draft_tokens = draft_tokens
    backend.speculative_step_id = 0
    backend.mtp_mask = backend_mod.AscendAttnMaskBuilder.generate_mask_flag(2048)
    return backend


@dataclass
class Paged:
    """Requests laid out in a paged KV pool: ``prefix`` cached tokens then a block."""

    prefix: list
    block: int
    page_size: int
    req_to_token: object
    req_pool_indices: object
    slots: int

    def prefix_locs(self):
        import torch

        return torch.cat([self.req_to_token[r, :p] for r, p in zip(self.req_pool_indices.tolist(), self.prefix)]).long()

    def block_locs(self):
        import torch

        rows = zip(self.req_pool_indices.tolist(), self.prefix)
        return torch.cat([self.req_to_token[r, p : p + self.block] for r, p in rows]).long()

    def kv_locs(self, b: int):
        r = int(self.req_pool_indices[b])
        return self.req_to_token[r, : self.prefix[b] + self.block].long()


def paged_layout(gen, prefix: list, block: int, page_size: int) -> Paged:
    """Shuffled pages per request (page 0 left out: sglang keeps it for padding)."""
    import torch

    totals = [p + block for p in prefix]
    pages_per = [-(-t // page_size) for t in totals]
    num_pages = sum(pages_per) + 2
    order = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    rows = len(prefix) + 2
    width = (max(pages_per) + 1) * page_size
    req_to_token = torch.zeros(rows, width, dtype=torch.int32)
    req_pool_indices = torch.randperm(rows, generator=gen)[: len(prefix)].to(torch.int64)
    used = 0
    for b, t in enumerate(totals):
        pages = torch.tensor(order[used : used + pages_per[b]])
        used += pages_per[b]
        pos = torch.arange(t)
        req_to_token[req_pool_indices[b], :t] = (pages[pos // page_size] * page_size + pos % page_size).to(torch.int32)
    return Paged(list(prefix), block, page_size, req_to_token, req_pool_indices, num_pages * page_size)


def verify_batch(paged: Paged, pool, backend, positions=None, input_embeds=None):
    """A TARGET_VERIFY forward batch of the draft block (what DFlash builds)."""
    import torch

    seq_lens = torch.tensor(paged.prefix, dtype=torch.int64)
    tokens = len(paged.prefix) * paged.block
    batch = types.SimpleNamespace(
        forward_mode=_verify_mode(),
        batch_size=len(paged.prefix),
        seq_lens=seq_lens,
        seq_lens_cpu=seq_lens.clone(),
        seq_lens_sum=int(seq_lens.sum()),
        req_pool_indices=paged.req_pool_indices,
        req_to_token_pool=types.SimpleNamespace(req_to_token=paged.req_to_token),
        token_to_kv_pool=pool,
        out_cache_loc=paged.block_locs(),
        num_token_non_padded_cpu=tokens,
        extend_seq_lens=None,
        extend_seq_lens_cpu=None,
        extend_prefix_lens=None,
        extend_prefix_lens_cpu=None,
        spec_info=None,
        positions=positions,
        input_embeds=input_embeds,
        attn_backend=backend,
        attn_cp_metadata=None,
    )
    if hasattr(backend, "init_forward_metadata"):
        backend.init_forward_metadata(batch)
    return batch


def reference_attention(q, pool, layer, paged: Paged, causal: bool):
    """Each request's block queries over its KV slots, computed with SDPA in float64."""
    import torch
    import torch.nn.functional as F

    hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
    k_all = pool.get_key_buffer(layer.layer_id)
    v_all = pool.get_value_buffer(layer.layer_id)
    outs = []
    for b, p in enumerate(paged.prefix):
        locs = paged.kv_locs(b)
        qb = q[b * paged.block : (b + 1) * paged.block].reshape(paged.block, hq, d).transpose(0, 1).double()
        kb = k_all[locs].transpose(0, 1).double()
        vb = v_all[locs].transpose(0, 1).double()
        mask = None
        if causal:
            # Bottom-right aligned: block token i sees the prefix and block tokens <= i.
            mask = torch.arange(p + paged.block)[None, :] <= (p + torch.arange(paged.block))[:, None]
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=layer.scaling, enable_gqa=True)
        outs.append(o.transpose(0, 1).reshape(paged.block, hq * d))
    return torch.cat(outs)


class OracleBackend:
    """Stand-in attention backend of the reference draft step: stores the block K/V
    like any backend, then non-causal SDPA over the request's context + block."""

    def __init__(self, paged: Paged):
        self.paged = paged

    def forward(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if save_kv_cache:
            forward_batch.token_to_kv_pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
        out = reference_attention(q, forward_batch.token_to_kv_pool, layer, self.paged, causal=False)
        return out.to(q.dtype)


def _radix_layer(shape: Shape, encoder_only: bool, layer_id: int = 0):
    radix = _module("sglang.srt.layers.radix_attention")
    kind = radix.AttentionType.ENCODER_ONLY if encoder_only else radix.AttentionType.DECODER
    return radix.RadixAttention(
        num_heads=shape.num_heads,
        head_dim=shape.head_dim,
        scaling=shape.head_dim**-0.5,
        num_kv_heads=shape.num_kv_heads,
        layer_id=layer_id,
        attn_type=kind,
    )


def run_mtp(shape: Shape, seed: int, prefix=(37, 5, 70), page_size: int = 16, function=None, encoder_only=True):
    """(output, reference, pool) of one ``forward_mtp`` call on a fresh pool.

    ``function`` defaults to the installed (patched) method.
    """
    import torch

    backend_mod = _module(BACKEND_MODULE)
    if function is None:
        function = backend_mod.AscendAttnBackend.forward_mtp
    gen = torch.Generator().manual_seed(seed)
    dtype = _dtype(shape.dtype)
    paged = paged_layout(gen, list(prefix), shape.block_size, page_size)
    pool = make_pool(shape, paged.slots - page_size, page_size, seed + 1, layers=1)
    # Cached context K/V at the prefix slots, in the range real K/V have.
    ctx = paged.prefix_locs()
    pool.k_buffer[0][ctx] = torch.randn(len(ctx), shape.num_kv_heads, shape.head_dim, generator=gen).to(dtype)
    pool.v_buffer[0][ctx] = torch.randn(len(ctx), shape.num_kv_heads, shape.head_dim, generator=gen).to(dtype)
    tokens = len(prefix) * shape.block_size
    q = torch.randn(tokens, shape.num_heads * shape.head_dim, generator=gen).to(dtype)
    k = torch.randn(tokens, shape.num_kv_heads, shape.head_dim, generator=gen).to(dtype)
    v = torch.randn(tokens, shape.num_kv_heads, shape.head_dim, generator=gen).to(dtype)
    layer = _radix_layer(shape, encoder_only)
    backend = make_backend(page_size, shape.block_size)
    batch = verify_batch(paged, pool, backend)
    with torch.no_grad():
        out = function(backend, q, k, v, layer, batch, True)
    ref = reference_attention(q, pool, layer, paged, causal=not encoder_only)
    return out, ref, pool


def run_mtp_case(shape: Shape, seed: int) -> list:
    backend_mod = _module(BACKEND_MODULE)
    patched, original = functions(backend_mod.AscendAttnBackend, "forward_mtp")
    dtype = _dtype(shape.dtype)
    out, ref, _ = run_mtp(shape, seed, function=patched, encoder_only=True)
    results = [close("ENCODER_ONLY layer vs non-causal SDPA", out, ref.to(out.dtype), dtype)]
    out_c, ref_c, pool_c = run_mtp(shape, seed, function=patched, encoder_only=False)
    out_o, _, pool_o = run_mtp(shape, seed, function=original, encoder_only=False)
    results.append(compare("causal layer vs original forward_mtp", out_c, out_o, exact=True))
    results.append(close("causal layer vs causal SDPA", out_c, ref_c.to(out_c.dtype), dtype))
    for i, (a, b) in enumerate(zip(pool_state(pool_c), pool_state(pool_o))):
        results.append(compare(f"causal layer KV buffer {i} vs original", a, b, exact=True))
    return results


# --------------------------------------------------------------------------- worker: context K/V, draft step


def make_worker(model, pool):
    """A real ``DFlashWorker`` (made with ``object.__new__``) around a draft model and pool."""
    worker_mod = _module(WORKER_MODULE)
    worker = object.__new__(worker_mod.DFlashWorker)
    worker.draft_model = model
    worker.draft_model_runner = types.SimpleNamespace(token_to_kv_pool=pool)
    return worker


def _context(gen, paged: Paged, shape: Shape):
    import torch

    hidden = torch.randn(sum(paged.prefix), shape.hidden_size, generator=gen).to(_dtype(shape.dtype))
    positions = torch.cat([torch.arange(p) for p in paged.prefix]).to(torch.int64)
    return hidden, positions, paged.prefix_locs()


def run_append(shape: Shape, seed: int, prefix=(19, 3, 44), page_size: int = 16) -> list:
    import torch

    worker_mod = _module(WORKER_MODULE)
    patched, original = functions(worker_mod.DFlashWorker, "_append_target_hidden_sequential")
    model = build_model(shape, seed)
    gen = torch.Generator().manual_seed(seed + 2)
    paged = paged_layout(gen, list(prefix), shape.block_size, page_size)
    hidden, positions, locs = _context(gen, paged, shape)
    dtype = _dtype(shape.dtype)
    states = []
    for function in (patched, original):
        pool = make_pool(shape, paged.slots - page_size, page_size, seed + 3)
        with torch.no_grad():
            function(make_worker(model, pool), hidden, positions, locs)
        states.append(pool_state(pool))
    n = shape.num_layers
    results = []
    for i, (a, b) in enumerate(zip(*states)):
        what = f"layer {i % n} {'k' if i < n else 'v'} buffer"
        results.append(close(f"{what}: context slots", a[locs], b[locs], dtype))
        untouched = torch.ones(a.shape[0], dtype=torch.bool)
        untouched[locs] = False
        results.append(compare(f"{what}: other slots untouched", a[untouched], b[untouched], exact=True))
    return results


def draft_step(model, shape: Shape, seed: int, *, ascend: bool, prefix=(21, 2, 35), page_size: int = 16):
    """Materialise the context K/V, then forward one draft block through the model.

    ``ascend``: the Ascend attention backend (whatever ``forward_mtp`` is installed);
    otherwise the SDPA oracle backend. Returns (hidden states, KV pool).
    """
    import torch

    worker_mod = _module(WORKER_MODULE)
    gen = torch.Generator().manual_seed(seed + 4)
    paged = paged_layout(gen, list(prefix), shape.block_size, page_size)
    hidden, ctx_positions, locs = _context(gen, paged, shape)
    pool = make_pool(shape, paged.slots - page_size, page_size, seed + 5)
    tokens = len(prefix) * shape.block_size
    embeds = torch.randn(tokens, shape.hidden_size, generator=gen).to(_dtype(shape.dtype))
    positions = torch.cat([p + torch.arange(shape.block_size) for p in paged.prefix]).to(torch.int64)
    backend = make_backend(page_size, shape.block_size) if ascend else OracleBackend(paged)
    with torch.inference_mode():  # as the DFlash worker runs its draft
        worker_mod.DFlashWorker._append_target_hidden_sequential(make_worker(model, pool), hidden, ctx_positions, locs)
        batch = verify_batch(paged, pool, backend, positions=positions, input_embeds=embeds)
        ids = torch.zeros(tokens, dtype=torch.int64)
        out = model(ids, positions, batch, input_embeds=embeds)
    return out.hidden_states, pool


def run_draft_step(shape: Shape, seed: int) -> list:
    """Patched model on the Ascend backend vs original model on the SDPA oracle."""
    dflash = _module(DFLASH_MODULE)
    worker_mod = _module(WORKER_MODULE)
    _, attn_original = functions(dflash.DFlashAttention, "forward")
    _, append_original = functions(worker_mod.DFlashWorker, "_append_target_hidden_sequential")
    model = build_model(shape, seed)
    got, pool = draft_step(model, shape, seed, ascend=True)
    with installed(dflash.DFlashAttention, "forward", attn_original), installed(
        worker_mod.DFlashWorker, "_append_target_hidden_sequential", append_original
    ):
        want, pool_ref = draft_step(model, shape, seed, ascend=False)
    # Rounding differences of the fused path propagate through the layers (MLP,
    # residuals): twice the magnitude-scaled tolerance.
    dtype = _dtype(shape.dtype)
    results = [compare("draft hidden states vs original model on SDPA oracle", got, want, 2 * scaled_tolerance(want, dtype))]
    for i, (a, b) in enumerate(zip(pool_state(pool), pool_state(pool_ref))):
        results.append(compare(f"KV buffer {i} vs reference", a, b, 2 * scaled_tolerance(b, dtype)))
    return results


# --------------------------------------------------------------------------- worker backend choice


class _Stop(Exception):
    pass


def chosen_draft_backend(init, *, draft_backend: Optional[str], attention_backend: Optional[str]) -> str:
    """The attention backend ``DFlashWorker.__init__`` (``init``) gives the draft runner.

    Runs the real ``__init__`` up to the draft ``TpModelWorker``, which is replaced
    by a recorder that stops the constructor there.
    """
    worker_mod = _module(WORKER_MODULE)
    server_args = default_server_args()
    server_args.speculative_draft_attention_backend = draft_backend
    server_args.attention_backend = attention_backend
    server_args.prefill_attention_backend = None
    server_args.decode_attention_backend = None
    target = types.SimpleNamespace(
        model_runner=types.SimpleNamespace(
            model_config=types.SimpleNamespace(context_len=4096), memory_pool_config=None
        ),
        get_memory_pool=lambda: (None, None),
        device="cpu",
    )
    seen = {}

    def draft_worker(*args, **kwargs):
        seen["server_args"] = kwargs["server_args"]
        raise _Stop

    worker = object.__new__(worker_mod.DFlashWorker)
    with emulation(), installed_module_attr(worker_mod, "TpModelWorker", draft_worker):
        try:
            init(worker, server_args=server_args, gpu_id=0, tp_rank=0, dp_rank=None, moe_ep_rank=0,
                 attn_cp_rank=0, moe_dp_rank=0, nccl_port=0, target_worker=target)
        except _Stop:
            pass
    if "server_args" not in seen:
        raise RuntimeError("DFlashWorker.__init__ did not reach the draft TpModelWorker")
    return seen["server_args"].attention_backend


@contextlib.contextmanager
def installed_module_attr(module, name, value):
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def run_worker_backend(draft_backend, attention_backend) -> list:
    worker_mod = _module(WORKER_MODULE)
    patched, _ = functions(worker_mod.DFlashWorker, "__init__")
    chosen = chosen_draft_backend(patched, draft_backend=draft_backend, attention_backend=attention_backend)
    wanted = draft_backend or attention_backend
    return [Comparison(f"draft runner backend {chosen!r}, asked {wanted!r}", 0.0 if chosen == wanted else math.inf, 0.0, exact=True)]


# --------------------------------------------------------------------------- NPU graph replay


class RecordingGraph:
    """Stand-in for an NPU graph: snapshots the input buffers when it replays."""

    def __init__(self, runner):
        self.runner = runner
        self.seen = None
        self.updates = []

    def replay(self):
        buffers, n = self.runner.buffers, self.runner.raw_num_token
        self.seen = {
            "input_ids": buffers.input_ids[:n].clone(),
            "positions": buffers.positions[:n].clone(),
            "input_embeds": buffers.input_embeds[:n].clone(),
        }

    def update(self, cpu_update_input):
        self.updates.append(cpu_update_input)


def make_graph_runner(*, draft: bool, dflash: bool, bs: int, block: int, hidden: int, dtype, vocab: int = 32):
    """A real ``NPUGraphRunner`` (``object.__new__``) with real input buffers and a recording graph."""
    import inspect

    import torch

    runner_mod = _module(GRAPH_RUNNER_MODULE)
    cgr = _module("sglang.srt.model_executor.cuda_graph_runner")
    spec = _module("sglang.srt.speculative.spec_info").SpeculativeAlgorithm
    logits_mod = _module("sglang.srt.layers.logits_processor")
    runner = object.__new__(runner_mod.NPUGraphRunner)
    runner.is_dllm = False
    runner._init_arch_map()
    runner.model_runner = types.SimpleNamespace(
        spec_algorithm=spec.DFLASH if dflash else spec.NONE,
        is_draft_worker=draft,
        model_config=types.SimpleNamespace(hf_config=types.SimpleNamespace(architectures=["DFlashDraftModel"])),
    )
    tokens = bs * block
    options = dict(
        device="cpu", max_bs=bs, max_num_token=tokens, hidden_size=hidden, vocab_size=vocab, dtype=dtype,
        dp_size=1, pp_size=1, is_encoder_decoder=False, require_mlp_tp_gather=False, seq_len_fill_value=1,
        encoder_len_fill_value=0, num_tokens_per_bs=block, cache_loc_dtype=torch.int32, enable_mamba_track=False,
    )
    params = inspect.signature(cgr.DecodeInputBuffers.create).parameters
    runner.buffers = cgr.DecodeInputBuffers.create(**{k: v for k, v in options.items() if k in params})
    runner.bs = runner.raw_bs = bs
    runner.raw_num_token = tokens
    runner.num_tokens_per_bs = block
    runner.graphs = {bs: RecordingGraph(runner)}
    runner.output_buffers = {
        bs: logits_mod.LogitsProcessorOutput(
            next_token_logits=torch.zeros(tokens, vocab), hidden_states=torch.zeros(tokens, hidden, dtype=dtype)
        )
    }
    return runner


def replay_once(function, runner, seed: int, hidden: int, dtype):
    """Replay a TARGET_VERIFY draft block with attention init skipped; (graph snapshot, batch)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    n = runner.raw_num_token
    batch = types.SimpleNamespace(
        forward_mode=_verify_mode(),
        input_ids=torch.randint(0, 30, (n,), generator=gen),
        positions=torch.randint(0, 500, (n,), generator=gen),
        input_embeds=torch.randn(n, hidden, generator=gen).to(dtype),
        seq_lens=torch.randint(1, 50, (runner.raw_bs,), generator=gen),
        mrope_positions=None,
    )
    function(runner, batch, skip_attn_backend_init=True)
    return runner.graphs[runner.bs].seen, batch


def run_replay(seed: int, bs: int = 2, block: int = 4, hidden: int = 16) -> list:
    import torch

    runner_mod = _module(GRAPH_RUNNER_MODULE)
    patched, _ = functions(runner_mod.NPUGraphRunner, "replay")
    dtype = torch.bfloat16
    results = []
    runner = make_graph_runner(draft=True, dflash=True, bs=bs, block=block, hidden=hidden, dtype=dtype)
    seen, batch = replay_once(patched, runner, seed, hidden, dtype)
    for name in ("input_embeds", "input_ids", "positions"):
        results.append(compare(f"DFlash draft runner: graph sees {name}", seen[name], getattr(batch, name), exact=True))
    for draft, dflash in ((False, True), (True, False)):
        runner = make_graph_runner(draft=draft, dflash=dflash, bs=bs, block=block, hidden=hidden, dtype=dtype)
        before = runner.buffers.input_embeds.clone()
        replay_once(patched, runner, seed, hidden, dtype)
        results.append(
            compare(f"runner draft={draft} dflash={dflash}: input_embeds buffer untouched",
                    runner.buffers.input_embeds, before, exact=True)
        )
    return results


# --------------------------------------------------------------------------- the cases


def _qkv_case(name: str, description: str, **shape) -> Case:
    return Case(PATCH_NAME, name, lambda seed: run_qkv(Shape(**shape), seed), description)


QKV_SHAPES = {
    # GQA ratio 1/2/4/8, head dims 64/128, with and without q/k norm biases.
    "qkv-gqa1-d64": dict(num_heads=4, num_kv_heads=4, head_dim=64),
    "qkv-gqa2-d128-bias": dict(num_heads=4, num_kv_heads=2, head_dim=128, norm_bias="both"),
    "qkv-gqa4-d64-bias": dict(num_heads=8, num_kv_heads=2, head_dim=64, norm_bias="both"),
    "qkv-gqa8-d128": dict(num_heads=8, num_kv_heads=1, head_dim=128),
    "qkv-gqa8-d64-bias": dict(num_heads=8, num_kv_heads=1, head_dim=64, norm_bias="both"),
    "qkv-gqa2-d64-qbias-only": dict(num_heads=4, num_kv_heads=2, head_dim=64, norm_bias="q"),
    "qkv-gqa4-d128-kbias-only": dict(num_heads=8, num_kv_heads=2, head_dim=128, norm_bias="k"),
    "qkv-gqa2-d64-attention-bias": dict(num_heads=4, num_kv_heads=2, head_dim=64, attention_bias=True),
}

_CASES: list = [
    *[
        _qkv_case(name, f"fused vs unfused DFlashAttention.forward, {shape}", **shape)
        for name, shape in QKV_SHAPES.items()
    ],
    Case(
        PATCH_NAME,
        "fallback-interleaved-rope",
        lambda seed: run_qkv(Shape(neox=False), seed, expect_fused=False),
        "interleaved RoPE is not expressible with every kernel build: the original path, bit for bit",
    ),
    Case(PATCH_NAME, "append-gqa4-d64", lambda seed: run_append(Shape(), seed), "context K/V through the fused path"),
    Case(
        PATCH_NAME,
        "append-gqa1-d128-bias",
        lambda seed: run_append(Shape(num_heads=4, num_kv_heads=4, head_dim=128, norm_bias="both"), seed),
        "context K/V through the fused path, biased norms",
    ),
    Case(PATCH_NAME, "mtp-gqa4-d64", lambda seed: run_mtp_case(Shape(), seed), "forward_mtp by attention type"),
    Case(
        PATCH_NAME,
        "mtp-gqa1-d128",
        lambda seed: run_mtp_case(Shape(num_heads=2, num_kv_heads=2, head_dim=128, block_size=8), seed),
        "forward_mtp by attention type, MHA, block 8",
    ),
    Case(PATCH_NAME, "draft-step", lambda seed: run_draft_step(Shape(), seed), "one whole DFlash draft step on Ascend"),
    Case(
        PATCH_NAME,
        "worker-backend-explicit",
        lambda seed: run_worker_backend("ascend", None),
        "--speculative-draft-attention-backend ascend is kept",
    ),
    Case(
        PATCH_NAME,
        "worker-backend-inherited",
        lambda seed: run_worker_backend(None, "ascend"),
        "the server's ascend attention backend is kept for the draft runner",
    ),
    Case(PATCH_NAME, "replay-embeds", run_replay, "NPU graph replay refreshes the DFlash draft embeddings"),
]

# Each case sets up (and afterwards restores) the emulation it needs, so that
# ``sgl-accel verify`` can run it in a bare process.
CASES: list = [dataclasses.replace(case, run=_self_contained(case.run)) for case in _CASES]
