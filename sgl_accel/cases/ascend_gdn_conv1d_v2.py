"""Equivalence cases for ``ascend-gdn-conv1d-v2`` (``AscendGDNAttnBackend.forward_extend``,
target-verify branch).

A case builds the real objects the branch uses: a ``HybridReqToTokenPool`` whose mamba
cache is a ``MambaPool.SpeculativeState`` with conv tensors in the NPU layout
(``_init_npu_conv_state``: per line ``[W-1 + D-1, dim]``), a real ``AscendGDNAttnBackend``
(its forward metadata from ``init_forward_metadata``), a ``RadixLinearAttention`` layer whose
``conv_weights`` is a view of a ``(dim, 1, W)`` Parameter (as Qwen3.5 builds it) and a
``ForwardBatch`` in TARGET_VERIFY mode. Stand-ins only for server-side objects: the model
runner handed to the backend's constructor and ``spec_info`` (draft_token_num, topk).
(MambaPool allocates its speculative caches on the literal device "cuda", so the case
assembles the SpeculativeState itself from the pool's own tensors.)

The branch runs up to the end of the conv update: the gating kernel that follows
(``fused_gdn_gating_kernel_without_sigmoid``) is replaced, for the duration of the run,
by a probe that stops the run, and the conv output is read from forward_extend's frame.

The oracle is ``causal_conv1d_update_reference`` from the test bed (pure torch, no
stand-ins; the mathematics of the SGLang-NPU right-aligned convention): per request, the outputs and the whole new line
``cat(line, drafts)[-state_len:]``; every other line of the pool stays as it was.
Outputs of pad entries are not compared (the AscendC op leaves them uninitialised, v2
leaves x's values; sglang discards them); their lines must stay untouched.

``evaluate(spec, seed)`` runs the original and the patched function (the patch must be
applied: the original is the patched function's ``__sgl_accel_original__``) and returns
both sets of comparisons; ``CASES`` wraps the patched side for ``sgl-accel verify``.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, field
from typing import Callable, Optional

from . import Case, Comparison, compare

PATCH_NAME = "ascend-gdn-conv1d-v2"
MODULE = "sglang.srt.hardware_backend.npu.attention.ascend_gdn_backend"
GATING = "fused_gdn_gating_kernel_without_sigmoid"
LAYERS = (0, 1)  # mamba layer ids of the pool; the case runs the second one
LAYER_ID = 1


@dataclass(frozen=True)
class Spec:
    draft: int  # draft tokens per request (D)
    width: int = 4  # conv kernel width (W)
    batch: int = 4
    # GDN head layout: num_k_heads, head_k_dim, num_v_heads, head_v_dim (q shares k's).
    heads: tuple = (1, 4, 2, 4)
    dtype: str = "bfloat16"
    pads: tuple = ()  # request positions whose mamba slot is the backend's pad_slot_id
    padded_rows: int = 0  # token rows past batch*draft (the eager branch slices them off)
    layout: str = "contiguous"  # or "layer-interleaved": the layer's conv cache is a strided view
    pad_slot_id: Optional[int] = None  # override the backend's pad_slot_id
    bias: bool = True
    activation: str = "silu"
    spare_lines: int = 3  # pool lines no request uses
    graph_mode: bool = False  # the backend as during graph capture (no token slicing)
    x_scale: float = 1.0

    @property
    def dim(self) -> int:
        nk, hk, nv, hv = self.heads
        return 2 * nk * hk + nv * hv

    @property
    def state_len(self) -> int:
        return self.width - 1 + self.draft - 1

    def label(self) -> str:
        extra = [f"pads{list(self.pads)}"] if self.pads else []
        if self.padded_rows:
            extra.append(f"+{self.padded_rows}rows")
        if self.layout != "contiguous":
            extra.append(self.layout)
        if self.pad_slot_id is not None:
            extra.append(f"pad_id={self.pad_slot_id}")
        if self.graph_mode:
            extra.append("graph")
        return f"D{self.draft}-W{self.width}-B{self.batch}-{self.dtype}" + "".join(f"-{e}" for e in extra)


@dataclass
class Bed:
    spec: Spec
    module: object
    backend: object
    layer: object
    forward_batch: object
    pool: object
    conv: object  # the pool's conv tensor of all layers [layers, lines, state_len, dim] (maybe a view)
    conv_initial: object  # its contents before any run (CPU copy)
    weight_param: object  # the (dim, 1, W) Parameter behind layer.conv_weights
    slots: list  # mamba slot per request (pad entries hold pad_slot_id)
    pad_slot_id: int
    mixed_qkv: object  # [tokens, dim] inputs (never handed to a run itself)
    a: object
    b: object


@dataclass
class Run:
    out: object  # conv output [batch*draft, dim] as the branch left it (.view(seq_len, -1))
    conv: object  # the whole conv tensor after the run (CPU copy)
    mixed_qkv: object  # the tensor passed as mixed_qkv, after the run
    a: object
    b: object
    error: Optional[BaseException] = None


@dataclass
class Outcome:
    spec: Spec
    patched: list  # Comparison, patched vs the reference
    original: list  # Comparison, original vs the reference ([] if it raised)
    original_error: Optional[BaseException] = None
    runs: dict = field(default_factory=dict)  # "original"/"patched" -> Run
    reference: tuple = ()  # (expected out rows [batch*draft, dim], expected conv tensor)

    @property
    def original_deviates(self) -> bool:
        return self.original_error is not None or not all(c.passed for c in self.original)


class _ConvDone(Exception):
    """Raised by the probe at the first call after the conv update."""


def _torch():
    import torch

    return torch


def default_device() -> str:
    torch = _torch()
    npu = getattr(torch, "npu", None)
    if npu is not None and npu.is_available():
        return "npu"
    return "cpu"


# --------------------------------------------------------------------------- building


def build(spec: Spec, seed: int, device: Optional[str] = None) -> Bed:
    """The real objects of one verify step, filled with seeded random data."""
    import importlib

    torch = _torch()
    device = device or default_device()
    module = importlib.import_module(MODULE)
    from sglang.srt.configs.mamba_utils import Mamba2CacheParams, Mamba2StateDType, Mamba2StateShape
    from sglang.srt.hardware_backend.npu.memory_pool_npu import _init_npu_conv_state
    from sglang.srt.layers.radix_linear_attention import RadixLinearAttention
    from sglang.srt.mem_cache.memory_pool import HybridReqToTokenPool, MambaPool
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    if spec.layout not in ("contiguous", "layer-interleaved"):
        raise ValueError(f"unknown layout {spec.layout!r}")
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, spec.dtype)
    nk, hk, nv, hv = spec.heads
    dim, width, draft, batch = spec.dim, spec.width, spec.draft, spec.batch
    lines = batch + spec.spare_lines  # usable mamba slots; slot 0 is the pool's dummy line

    shape = Mamba2StateShape.create(
        tp_world_size=1, intermediate_size=nv * hv, n_groups=nk, num_heads=nv, head_dim=hv,
        state_size=hk, conv_kernel=width,
    )
    params = Mamba2CacheParams(shape=shape, layers=list(LAYERS), dtype=Mamba2StateDType(conv=dtype, temporal=torch.float32))
    pool = HybridReqToTokenPool(
        size=batch + 1, mamba_size=lines, mamba_spec_state_size=lines, max_context_len=8, device=device,
        enable_memory_saver=False, cache_params=params, mamba_layer_ids=list(LAYERS),
        enable_mamba_extra_buffer=False, speculative_num_draft_tokens=None,
    )
    plain = pool.mamba_pool.mamba_cache
    conv = _init_npu_conv_state(plain.conv[0], shape.conv, draft)[0]
    if spec.layout == "layer-interleaved":
        # Same shape, lines outermost in memory: each layer's cache is a strided view.
        conv = torch.empty((conv.shape[1], conv.shape[0], *conv.shape[2:]), dtype=dtype, device=device).transpose(0, 1)
    conv.copy_(torch.randn(conv.shape, generator=gen).to(dtype))
    spec_state = MambaPool.SpeculativeState(
        conv=[conv],
        temporal=plain.temporal,
        intermediate_ssm=torch.zeros((len(LAYERS), lines + 1, draft, *shape.temporal), device=device),
        intermediate_conv_window=[torch.zeros((len(LAYERS), lines + 1, draft, *shape.conv[0]), dtype=dtype, device=device)],
    )
    pool.mamba_pool.mamba_cache = spec_state

    # What the backends' constructors read of the model runner (0.5.13 adds the last two).
    runner = types.SimpleNamespace(
        device=device, server_args=types.SimpleNamespace(speculative_eagle_topk=1), req_to_token_pool=pool,
        is_draft_worker=False, token_to_kv_pool=None,
    )
    backend = module.AscendGDNAttnBackend(runner)
    if spec.pad_slot_id is not None:
        backend.pad_slot_id = spec.pad_slot_id
    pad_id = backend.pad_slot_id

    order = torch.randperm(lines, generator=gen)[:batch] + 1
    slots = [pad_id if r in spec.pads else int(order[r]) for r in range(batch)]
    pool.req_index_to_mamba_index_mapping[:batch] = torch.tensor(slots, dtype=torch.int32, device=device)

    weight_param = torch.nn.Parameter((torch.randn((dim, 1, width), generator=gen) * 0.5).to(dtype).to(device), requires_grad=False)
    bias = (torch.randn(dim, generator=gen) * 0.1).to(dtype).to(device) if spec.bias else None
    layer = RadixLinearAttention(
        layer_id=LAYER_ID, num_q_heads=nk, num_k_heads=nk, num_v_heads=nv, head_q_dim=hk, head_k_dim=hk,
        head_v_dim=hv, conv_weights=weight_param.view(dim, width), bias=bias, activation=spec.activation,
        A_log=torch.zeros(nv, device=device), dt_bias=torch.zeros(nv, device=device),
    )

    tokens = batch * draft + spec.padded_rows
    forward_batch = ForwardBatch(
        forward_mode=ForwardMode.TARGET_VERIFY,
        batch_size=batch,
        input_ids=torch.zeros(tokens, dtype=torch.int64, device=device),
        req_pool_indices=torch.arange(batch, dtype=torch.int64, device=device),
        seq_lens=torch.full((batch,), 8, dtype=torch.int64, device=device),
        out_cache_loc=torch.zeros(tokens, dtype=torch.int64, device=device),
        seq_lens_sum=8 * batch,
        spec_info=types.SimpleNamespace(draft_token_num=draft, topk=1),
        num_token_non_padded_cpu=batch * draft,
    )
    backend.init_forward_metadata(forward_batch)
    if spec.graph_mode:
        if spec.padded_rows:
            raise ValueError("graph mode runs exactly batch*draft tokens")
        backend.graph_mode = True

    mixed_qkv = (torch.randn((tokens, dim), generator=gen) * spec.x_scale).to(dtype).to(device)
    a = torch.randn((tokens, nv), generator=gen).to(dtype).to(device)
    b = torch.randn((tokens, nv), generator=gen).to(dtype).to(device)
    return Bed(spec, module, backend, layer, forward_batch, pool, conv, conv.detach().cpu().clone(),
               weight_param, slots, pad_id, mixed_qkv, a, b)


# --------------------------------------------------------------------------- running


@contextlib.contextmanager
def _stop_after_conv(module):
    def probe(*args, **kwargs):
        raise _ConvDone()

    saved = module.__dict__[GATING]
    setattr(module, GATING, probe)
    try:
        yield
    finally:
        setattr(module, GATING, saved)


def _branch_locals(exc: BaseException) -> dict:
    frame = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "forward_extend":
            frame = tb.tb_frame
        tb = tb.tb_next
    if frame is None:
        raise RuntimeError("the probe fired outside forward_extend")
    return frame.f_locals


def run_branch(bed: Bed, forward_extend: Callable, around=None, x=None) -> Run:
    """Run ``forward_extend(backend, ...)`` on fresh copies of the inputs and the initial
    conv state; ``around`` (a context manager) wraps only the call itself."""
    torch = _torch()
    bed.conv.copy_(bed.conv_initial.to(bed.conv.device))  # in place: views stay views
    x = bed.mixed_qkv.clone() if x is None else x
    a, b = bed.a.clone(), bed.b.clone()
    error = None
    out = None
    with _stop_after_conv(bed.module):
        try:
            with around if around is not None else contextlib.nullcontext():
                forward_extend(bed.backend, bed.layer, bed.forward_batch, x, a, b)
        except _ConvDone as stop:
            out = _branch_locals(stop)["mixed_qkv"]
        except Exception as exc:  # recorded: e.g. the AscendC op refuses a strided cache
            error = exc
        else:
            raise RuntimeError("forward_extend returned without reaching the gating kernel")
    return Run(
        out=None if out is None else out.detach().cpu().clone(),
        conv=bed.conv.detach().cpu().clone(),
        mixed_qkv=x.detach().cpu().clone(),
        a=a.detach().cpu().clone(),
        b=b.detach().cpu().clone(),
        error=error,
    )


def reference(bed: Bed, weight=None):
    """(expected output rows [batch*draft, dim], expected conv tensor) from the oracle.

    Pad rows of the output are NaN (not compared)."""
    torch = _torch()
    from sgl_accel.testing.kernels.conv1d import causal_conv1d_update_reference

    spec = bed.spec
    x = bed.mixed_qkv.detach().cpu()[: spec.batch * spec.draft].view(spec.batch, spec.draft, spec.dim)
    weight = bed.layer.conv_weights if weight is None else weight
    w = weight.detach().cpu().transpose(0, 1)
    bias = None if bed.layer.bias is None else bed.layer.bias.detach().cpu()
    layer_idx = LAYERS.index(LAYER_ID)
    expected = bed.conv_initial.clone()
    out = torch.full((spec.batch, spec.draft, spec.dim), float("nan"), dtype=x.dtype)
    live = [r for r, s in enumerate(bed.slots) if s != bed.pad_slot_id]
    if live:
        lines = bed.conv_initial[layer_idx, [bed.slots[r] for r in live]]
        y, new_lines = causal_conv1d_update_reference(x[live], lines, w, bias, spec.activation)
        out[live] = y
        for i, r in enumerate(live):
            expected[layer_idx, bed.slots[r]] = new_lines[i]
    return out.view(spec.batch * spec.draft, spec.dim), expected


def output_tolerance(dtype, expected) -> float:
    """One unit in the last place of the largest expected output."""
    torch = _torch()
    finite = expected[torch.isfinite(expected)]
    peak = float(finite.abs().max()) if finite.numel() else 1.0
    return torch.finfo(dtype).eps * max(1.0, peak)


def comparisons(bed: Bed, run: Run, expected_out, expected_conv) -> list:
    torch = _torch()
    spec = bed.spec
    if run.error is not None:
        return [Comparison("run", float("inf"), 0.0, note=f"{type(run.error).__name__}: {run.error}")]
    live = [r for r, s in enumerate(bed.slots) if s != bed.pad_slot_id]
    rows = torch.tensor([r * spec.draft + t for r in live for t in range(spec.draft)], dtype=torch.long)
    result = []
    if len(rows):
        want = expected_out[rows]
        result.append(compare("output rows of live requests", run.out[rows], want, output_tolerance(run.out.dtype, want)))
    layer_idx = LAYERS.index(LAYER_ID)
    used = sorted({s for s in bed.slots if s != bed.pad_slot_id})
    named = f"{used}" if len(used) <= 8 else f"of the {len(used)} live requests"
    result.append(compare(f"conv lines {named} (whole lines)", run.conv[layer_idx, used], expected_conv[layer_idx, used], exact=True))
    others = [i for i in range(run.conv.shape[1]) if i not in used]
    result.append(compare("conv lines no request uses (incl. dummy line 0)", run.conv[layer_idx, others],
                          expected_conv[layer_idx, others], exact=True))
    other_layers = [i for i in range(run.conv.shape[0]) if i != layer_idx]
    result.append(compare("conv state of the other layer", run.conv[other_layers], expected_conv[other_layers], exact=True))
    result.append(compare("a, b untouched", torch.cat([run.a, run.b]), torch.cat([bed.a, bed.b]).cpu(), exact=True))
    return result


def functions(module) -> tuple:
    """(original, patched) forward_extend; the patch must be applied."""
    patched = module.AscendGDNAttnBackend.__dict__["forward_extend"]
    original = getattr(patched, "__sgl_accel_original__", None)
    if original is None:
        raise RuntimeError(f"{PATCH_NAME} is not applied to {MODULE} (apply it before running its cases)")
    return original, patched


def evaluate(spec: Spec, seed: int, device: Optional[str] = None) -> Outcome:
    bed = build(spec, seed, device)
    original, patched = functions(bed.module)
    expected_out, expected_conv = reference(bed)
    runs = {"original": run_branch(bed, original), "patched": run_branch(bed, patched)}
    return Outcome(
        spec=spec,
        patched=comparisons(bed, runs["patched"], expected_out, expected_conv),
        original=[] if runs["original"].error else comparisons(bed, runs["original"], expected_out, expected_conv),
        original_error=runs["original"].error,
        runs=runs,
        reference=(expected_out, expected_conv),
    )


def _case_run(spec: Spec) -> Callable[[int], list]:
    def run(seed: int) -> list:
        outcome = evaluate(spec, seed)
        if outcome.original_deviates:
            why = (f"{type(outcome.original_error).__name__}" if outcome.original_error
                   else "; ".join(f"{c.what}: {c.max_abs_diff:g}" for c in outcome.original if not c.passed))
            for c in outcome.patched:
                c.note = (c.note + "; " if c.note else "") + f"original deviates ({why}): correctness gain"
        return outcome.patched

    return run


SPECS = (
    [Spec(draft=d) for d in range(1, 6)]
    + [Spec(draft=d, pads=(1,), padded_rows=3) for d in (2, 3, 4)]
    + [Spec(draft=3, dtype="float16", bias=False), Spec(draft=4, layout="layer-interleaved")]
    + [Spec(draft=4, pads=(3,), graph_mode=True)]
    # 50 requests over 48 vector cores: the last core runs items 47-49; the pad entry at 47
    # shifts the x rows the AscendC op reads for 48 and 49.
    + [Spec(draft=3, batch=50, heads=(1, 2, 1, 4), pads=(47,), spare_lines=2)]
)

CASES = [
    Case(PATCH_NAME, spec.label(), _case_run(spec),
         "verify-step conv update vs the mathematical reference: outputs and whole conv lines")
    for spec in SPECS
]
