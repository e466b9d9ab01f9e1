"""Faster conv-state update in the GDN speculative verify step on Ascend (upstream #24595).

What: ``AscendGDNAttnBackend.forward_extend``, target-verify branch, calls the AscendC op
``torch.ops.npu.causal_conv1d_update``; this patch makes it call sgl-kernel-npu's Triton
``sgl_kernel_npu.mamba.causal_conv1d.causal_conv1d_update_v2`` with the same meaning
(num_accepted = draft length, i.e. history = the last W-1 slots of the line, the line
becomes ``cat(line, drafts)[-state_len:]``).

Why: upstream measured the verify-step conv update at ~300 us -> ~140 us (Qwen3.5-397B)
and ~550 us -> ~200 us (Qwen3-Next). It is also more correct, going by the sources of the
AscendC op (npu-ops.md 2.2; reproduced by the test-bed model, not on an NPU): for width 4
it matches the mathematics only for 3 or 4 draft tokens (its host pre-shift corrupts the
history for 1-2 drafts and leaves stale slots for 5+, which ``conv_state_rollback`` later
reads), it pre-shifts the dummy line 0 when a pad entry is present, and a pad entry
shifts the x rows read by later items on the same core.

Where it differs from upstream's form (0.5.12.post1):
* ``conv_states`` is passed as it is. The v2 kernel addresses the state through its
  strides, so a non-contiguous cache view is updated in place; upstream's
  ``conv_states.contiguous()`` would copy such a view and drop the update.
* ``pad_slot_id`` is the backend's ``self.pad_slot_id`` (upstream hard-codes -1).
* The weights go in as ``layer.conv_weights.transpose(0, 1)``, a view: the kernel reads
  them through their strides too, so nothing is copied per call (upstream copies the
  transposed weights on every verify step of every layer). Nothing is cached either, on
  purpose: sglang reloads weights in place through ``param.data`` (``default_weight_loader``,
  ``mamba_v2_sharded_weight_loader``), which leaves ``_version`` untouched, and captured
  graphs never re-run a cache check, so a cached transposed copy would go stale after
  ``update_weights_*``. The view always reads the live weights.
* The activation is passed as the original's ``layer.activation == "silu"`` boolean, so an
  unexpected activation string behaves exactly as before.

Behaviour the kernel brings, decided here:
* v2 writes its result into x's storage, i.e. into ``mixed_qkv`` (the AscendC op
  returned a new tensor). That buffer is dead after the conv: forward_extend rebinds the
  name, and the NPU callers pass a fresh tensor they never read again (Qwen3-Next:
  sgl_kernel_npu ``fused_qkvzba_split_reshape_cat`` allocates it; Qwen3.5: ``torch.cat``).
  ``a``, ``b``, weights and bias are not written.
* v2 multiplies fp16 operands even for bf16 models. bf16 values with |v| >= 2**-14 are
  exact in fp16, smaller ones are rounded to 2**-24, and |v| >= 65520 becomes +-inf in the
  output rows whose window contains it (the conv-state line still stores the exact bf16
  value). GDN conv inputs are projections of normalised activations, orders of magnitude
  below that; detecting it per call would need a device reduction plus a host sync, which
  costs more than the patch saves and breaks graph capture. Disable the patch
  (SGL_ACCEL_DISABLE=ascend-gdn-conv1d-v2) for a model whose conv inputs reach 6.5e4.

Releases (scanner + tests): 0.5.11 applies; 0.5.12 to 0.5.17 already call v2 (upstream);
from 0.5.18 the verify branch calls the AscendC ``torch.ops.npu.causal_conv1d`` op
(``run_mode=1``: conv and conv-state update of the packed draft tokens in one op), which
replaces both update kernels (``replaced``). 0.5.10.post1 and older have no
ascend_gdn_backend: GDN on NPU runs the generic GDN backend on sgl_kernel_npu's Triton
``causal_conv1d_update_npu`` (``older-form``; the AscendC op this patch replaces is not
used). Drop this patch once no supported release predates 0.5.12.
"""

from sgl_accel._guard import SourceCheck
from sgl_accel._registry import Part, Patch, Target
from sgl_accel._rewrite import Present, Probe, Rule, dotted_name, walk

MODULE = "sglang.srt.hardware_backend.npu.attention.ascend_gdn_backend"
QUALNAME = "AscendGDNAttnBackend.forward_extend"
KERNEL = "sgl_kernel_npu.mamba.causal_conv1d:causal_conv1d_update_v2"


def _helpers():
    # The kernel itself, bound as a closure variable: no wrapper frame per call.
    from sgl_kernel_npu.mamba.causal_conv1d import causal_conv1d_update_v2

    return {"_sgl_accel_causal_conv1d_update_v2": causal_conv1d_update_v2}


_RULES = [
    # v2 equals the AscendC op only with num_accepted == the draft length (history = the
    # last W-1 slots); insist on the statement that sets it up.
    Present(
        "num_accepted_tokens is the full draft length",
        "num_accepted_tokens = torch.full((batch_size,), draft_token_num, dtype=torch.int32, device=mixed_qkv.device)",
    ),
    Rule(
        "AscendC causal_conv1d_update -> causal_conv1d_update_v2 (state view, weight view, backend pad id)",
        "torch.ops.npu.causal_conv1d_update(__x, __w.transpose(0, 1).contiguous(), __states, __indices,"
        " __bias, __accepted, None, __silu, __pad)",
        "_sgl_accel_causal_conv1d_update_v2(__x, __states, __w.transpose(0, 1), bias=__bias, activation=__silu,"
        " conv_state_indices=__indices, num_accepted_tokens=__accepted, pad_slot_id=__pad, validate_data=False)",
    ),
]

def _verify_on_fused_ascendc_conv(def_node) -> int:
    """Calls of the AscendC ``torch.ops.npu.causal_conv1d`` op in decode/verify mode (``run_mode=1``)."""
    import ast

    found = 0
    for node in walk(def_node):
        if isinstance(node, ast.Call) and dotted_name(node.func) == "torch.ops.npu.causal_conv1d":
            found += any(k.arg == "run_mode" and isinstance(k.value, ast.Constant) and k.value.value == 1 for k in node.keywords)
    return found


# 0.5.18+: the verify branch runs the AscendC causal_conv1d op (one op for conv + state update
# over the packed tokens, run_mode=1) instead of either causal_conv1d_update form.
_REPLACED_BY_FUSED_OP = (
    Probe("torch.ops.npu.causal_conv1d(..., run_mode=1)", _verify_on_fused_ascendc_conv),
    "the verify conv runs on the AscendC causal_conv1d op (run_mode=1), which replaces "
    "causal_conv1d_update and its v2 form and does the same job in one op",
)

# Before 0.5.11 there is no Ascend GDN backend: GDN on NPU runs the generic GDN backend, whose
# verify conv calls sgl_kernel_npu's Triton causal_conv1d_update_npu (never the AscendC op).
GENERIC_GDN_MODULES = (
    "sglang.srt.layers.attention.linear.gdn_backend",  # 0.5.10, 0.5.10.post1
    "sglang.srt.layers.attention.hybrid_linear_attn_backend",  # 0.5.3.post3 - 0.5.9
)


def _generic_backend_on_triton_update(def_node, reader) -> int:
    """1 when the release has no AscendGDNAttnBackend and its generic GDN backend imports
    sgl_kernel_npu's causal_conv1d_update_npu for NPU."""
    import ast

    if def_node is not None:
        return 0
    for module in GENERIC_GDN_MODULES:
        tree = reader.module(module)
        for node in ast.walk(tree) if tree is not None else ():
            if (
                isinstance(node, ast.ImportFrom)
                and node.module == "sgl_kernel_npu.mamba.causal_conv1d"
                and any(alias.name == "causal_conv1d_update_npu" for alias in node.names)
            ):
                return 1
    return 0


_OLDER_GENERIC_BACKEND = (
    SourceCheck(
        "generic GDN backend on sgl_kernel_npu's causal_conv1d_update_npu",
        _generic_backend_on_triton_update,
        modules=GENERIC_GDN_MODULES,
    ),
    "older form: no Ascend GDN backend yet; GDN on NPU runs the generic GDN backend "
    "(layers/attention/linear/gdn_backend.py, before 0.5.10 hybrid_linear_attn_backend.py), whose "
    "verify conv calls sgl_kernel_npu's Triton causal_conv1d_update_npu, not the AscendC op this patch replaces",
)

PATCH = Patch(
    name="ascend-gdn-conv1d-v2",
    upstream_pr="#24595",
    kind="perf",
    summary="GDN target-verify conv-state update on Ascend via sgl_kernel_npu causal_conv1d_update_v2",
    hardware=("ascend",),
    kernels=(KERNEL,),
    releases=">=0.5.11",
    parts=[
        Part(
            "verify-conv",
            [
                Target(
                    MODULE,
                    QUALNAME,
                    rules=_RULES,
                    # Any use of the v2 kernel's name in forward_extend: the release has the change.
                    upstream=["causal_conv1d_update_v2"],
                    replaced=[_REPLACED_BY_FUSED_OP],
                    older=[_OLDER_GENERIC_BACKEND],
                )
            ],
        )
    ],
    helpers=_helpers,
)
