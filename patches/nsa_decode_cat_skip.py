"""No redundant q concatenation in NSA decode on ROCm gfx95 (GLM-5 / DeepSeek-V3.2 TileLang path).

Upstream: the "GLM-5 NSA TileLang cat-skip" change (no PR number in the seed; it builds on
#23562), first released in 0.5.12.post1.

What: on ROCm gfx95 with aiter, ``DeepseekMLAForwardMixin.forward_absorb_core`` runs aiter's
fused RoPE + KV-cache write (``fused_qk_rope_cat_and_cache_mla``), which already returns the
absorbed query as one tensor ``q_cat`` (kv_lora_rank 512 + rope 64 = 576 per head). Releases
that predate the change slice it into ``q_cat[..., :512]`` / ``q_cat[..., 512:]`` and hand the
halves to ``NativeSparseAttnBackend.forward_decode``, whose tilelang and aiter branches
concatenate them again (``concat_mla_absorb_q_general`` = ``torch.cat`` on HIP): a tensor
byte-identical to ``q_cat``, one copy kernel and one fresh T x H x 576 allocation per layer per
decode step. Upstream measured GLM-5 on MI355X TP=8: throughput +1.4 %, TPOT -1.0 %.

How (part ``cat-skip``, both targets or neither):
* ``forward_absorb_core``, fused-RoPE branch: in decode/idle mode ``q_cat`` goes to
  ``attn_mqa`` whole with ``q_rope=None``; prefill/extend keep the split form
  (``forward_extend`` asserts ``q_rope is not None``). ``llama_4_scaling`` scales the absorbed
  part in place through a view of ``q_cat``. Better than upstream: upstream writes
  ``q_cat[..., :512] *= s``, which Python runs as get-slice, in-place multiply, then
  ``__setitem__`` of the slice onto itself (one more T x H x 512 copy kernel); here the view
  is bound to a name and multiplied in place, which is all the original did.
* ``forward_decode``: the split branch sets ``q_all = None``; the already existing
  ``q_rope is None`` branch keeps its zero-copy ``q.contiguous().view(-1, H, 576)`` as
  ``q_all``; the tilelang and aiter branches concatenate only when ``q_all is None or not
  _is_hip``. CUDA and MUSA (``_is_hip`` False) re-concatenate exactly as before, and their
  forward_absorb_core path (no aiter, so no fused branch) is untouched. The flashmla and fa3
  branches are not changed (not reachable on HIP).

Gates: hardware ``rocm`` with a gfx95 arch and aiter importable (the fused branch exists
only there, ``_use_aiter_gfx95``). Both targets must pass the structural guard together.

Releases (checked against the real wheels): 0.5.10, 0.5.10.post1 and 0.5.11 have the
pre-change shape (0.5.11 differs from 0.5.10.post1 only by an extra MUSA branch after the
attention call, outside the rewritten statements). 0.5.12.post1 has the change
(``upstream``). 0.5.13 renamed NSA to DSA: the backend now lives in
``layers/attention/dsa_backend.py`` as ``DeepseekSparseAttnBackend`` (with the change), and
``nsa_backend.py`` is a re-export shim that sglang itself never imports (in 0.5.13.post1 it
does not even import: it re-exports ``NativeSparseAttnBackend``, which dsa_backend no longer
defines). The backend target therefore names dsa_backend as its ``moved`` place, and 0.5.13+
report ``upstream`` from there. 0.5.18 moved the ROCm absorb path into
``forward_mla_rocm.py`` (``DeepseekMLARocmForwardMixin.forward_absorb_rocm_core``, with the
change), which the MLA target names as its ``moved`` place; 0.5.18+ report ``upstream``. 0.5.9
has no ``deepseek_common/attention_forward_methods/forward_mla.py``; the range starts at 0.5.10.

Drop this patch when no supported install is older than 0.5.12.post1.
"""

from sgl_accel._registry import Part, Patch, Target
from sgl_accel._rewrite import Present, Rule

MLA_MODULE = "sglang.srt.models.deepseek_common.attention_forward_methods.forward_mla"
MLA_QUALNAME = "DeepseekMLAForwardMixin.forward_absorb_core"
BACKEND_MODULE = "sglang.srt.layers.attention.nsa_backend"
BACKEND_QUALNAME = "NativeSparseAttnBackend.forward_decode"
# 0.5.13 renamed NSA to DSA; nsa_backend.py became a re-export shim (a broken one in 0.5.13.post1).
DSA_BACKEND = ("sglang.srt.layers.attention.dsa_backend", "DeepseekSparseAttnBackend.forward_decode")
# 0.5.18 moved the ROCm absorb path (and its fused q_cat branch) into its own mixin;
# forward_mla.py keeps a forward_absorb_core without that branch.
ROCM_MLA = (
    "sglang.srt.models.deepseek_common.attention_forward_methods.forward_mla_rocm",
    "DeepseekMLARocmForwardMixin.forward_absorb_rocm_core",
)

# forward_absorb_core, fused-RoPE branch: the split hand-over of q_cat.
_SPLIT_HANDOVER = """
q_nope_fused = q_cat[..., : self.kv_lora_rank]
q_pe_fused = q_cat[..., self.kv_lora_rank :]
save_kv_cache = False
if llama_4_scaling is not None:
    q_nope_fused *= llama_4_scaling
attn_output = self.attn_mqa(
    q_nope_fused,
    None,
    None,
    forward_batch,
    q_rope=q_pe_fused,
    k_rope=k_pe_fused,
    save_kv_cache=save_kv_cache,
    **(dict(topk_indices=topk_indices) if topk_indices is not None else {}),
)
"""

# Decode/idle: q_cat whole, q_rope=None (forward_decode views it as q_all). Prefill and
# extend keep the split form. The scaling view is named, not assigned back through
# __setitem__, so no extra copy runs.
_DECODE_HANDOVER = """
save_kv_cache = False
if forward_batch.forward_mode.is_decode_or_idle():
    if llama_4_scaling is not None:
        q_nope_fused = q_cat[..., : self.kv_lora_rank]
        q_nope_fused *= llama_4_scaling
    attn_output = self.attn_mqa(
        q_cat,
        None,
        None,
        forward_batch,
        q_rope=None,
        k_rope=k_pe_fused,
        save_kv_cache=save_kv_cache,
        **(dict(topk_indices=topk_indices) if topk_indices is not None else {}),
    )
else:
    q_nope_fused = q_cat[..., : self.kv_lora_rank]
    q_pe_fused = q_cat[..., self.kv_lora_rank :]
    if llama_4_scaling is not None:
        q_nope_fused *= llama_4_scaling
    attn_output = self.attn_mqa(
        q_nope_fused,
        None,
        None,
        forward_batch,
        q_rope=q_pe_fused,
        k_rope=k_pe_fused,
        save_kv_cache=save_kv_cache,
        **(dict(topk_indices=topk_indices) if topk_indices is not None else {}),
    )
"""

# forward_decode: how q arrives (split halves, or one concatenated q).
_Q_LAYOUT = """
if q_rope is not None:
    q_nope = q.view(-1, layer.tp_q_head_num, layer.v_head_dim)
    q_rope = q_rope.view(-1, layer.tp_q_head_num, layer.head_dim - layer.v_head_dim)
else:
    q_all = q.contiguous().view(-1, layer.tp_q_head_num, layer.head_dim)
    q_nope = q_all[:, :, : layer.v_head_dim]
    q_rope = q_all[:, :, layer.v_head_dim :]
"""

_Q_LAYOUT_MARKED = """
if q_rope is not None:
    q_nope = q.view(-1, layer.tp_q_head_num, layer.v_head_dim)
    q_rope = q_rope.view(-1, layer.tp_q_head_num, layer.head_dim - layer.v_head_dim)
    q_all = None
else:
    q_all = q.contiguous().view(-1, layer.tp_q_head_num, layer.head_dim)
    q_nope = q_all[:, :, : layer.v_head_dim]
    q_rope = q_all[:, :, layer.v_head_dim :]
"""

_TILELANG_CALL = (
    "return self._forward_tilelang(q_all=q_all, kv_cache=kv_cache, page_table_1=page_table_1, "
    "sm_scale=layer.scaling, v_head_dim=layer.v_head_dim)"
)
_AITER_CALL = (
    "return self._forward_aiter(q_all=q_all, kv_cache=kv_cache, page_table_1=page_table_1, "
    "layer=layer, metadata=metadata, bs=forward_batch.batch_size)"
)


def _concat_once(concat: str, call: str, what: str) -> Rule:
    # The q_rope test is always true by then (the q_rope=None branch rebinds q_rope to a
    # view), so the original concatenates even a q it has just viewed whole.
    return Rule(
        f"{what}: concatenate only split halves (HIP), as before elsewhere",
        find=f"if q_rope is not None:\n    q_all = {concat}\n{call}",
        replace=f"if q_all is None or not _is_hip:\n    q_all = {concat}\n{call}",
    )


def _gfx95_with_aiter(hw):
    """The fused branch that builds q_cat runs only with aiter on gfx95 (MI350/MI355)."""
    arch = (hw.arch or "").lower()
    if not arch.startswith("gfx95"):
        return f"needs a gfx95 GPU (MI350/MI355), found {arch or 'an unknown gfx arch'}"
    if not hw.details.get("aiter"):
        return "needs aiter (its fused RoPE + cache kernel builds q_cat)"
    return None


PATCH = Patch(
    name="nsa-decode-cat-skip",
    upstream_pr="GLM-5 cat-skip",
    kind="perf",
    summary="NSA decode on ROCm gfx95: hand q_cat to the tilelang/aiter kernels as a view, no re-concatenation",
    hardware=("rocm",),
    releases=">=0.5.10",
    parts=[
        Part(
            "cat-skip",
            [
                Target(
                    MLA_MODULE,
                    MLA_QUALNAME,
                    rules=[
                        Present(
                            "the fused RoPE + cache call that builds q_cat",
                            "q_cat, _, k_pe_fused, _ = fused_qk_rope_cat_and_cache_mla(q_nope_out, q_pe, k_nope, k_pe, "
                            "__kv_buffer, forward_batch.out_cache_loc, positions, cos, sin, __k_scale, __is_neox, "
                            "q_out_dtype=kv_cache_dtype)",
                        ),
                        Rule("decode/idle hands q_cat over whole", find=_SPLIT_HANDOVER, replace=_DECODE_HANDOVER),
                    ],
                    upstream=[
                        "self.attn_mqa(q_cat, None, None, forward_batch, q_rope=None, k_rope=k_pe_fused, "
                        "save_kv_cache=save_kv_cache, **__topk)",
                    ],
                    moved=[ROCM_MLA],
                ),
                Target(
                    BACKEND_MODULE,
                    BACKEND_QUALNAME,
                    rules=[
                        Rule("mark split halves with q_all = None", find=_Q_LAYOUT, replace=_Q_LAYOUT_MARKED),
                        _concat_once("concat_mla_absorb_q_general(q_nope, q_rope)", _TILELANG_CALL, "tilelang"),
                        _concat_once("torch.cat([q_nope, q_rope], dim=-1)", _AITER_CALL, "aiter"),
                    ],
                    upstream=["q_all is None or not _is_hip"],
                    moved=[DSA_BACKEND],
                ),
            ],
        )
    ],
    hardware_check=_gfx95_with_aiter,
)
