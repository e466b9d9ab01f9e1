"""DFlash speculative decoding on Ascend NPU (upstream #23122).

Releases with the V1 DFlash worker (0.5.11, 0.5.12.post1) run DFlash on NPU badly
or not at all: the draft worker silently swaps the requested "ascend" attention
backend for flashinfer, the NPU graph runner replays the draft block without its
input embeddings (the skip-attn-init replay path only refreshes ids and
positions), the Ascend MTP attention applies the causal chain mask to DFlash's
non-causal (ENCODER_ONLY) draft attention, and the draft layers run QKV split,
q/k RMSNorm and RoPE as separate NPU ops. The four pieces are rewritten together:

1. ``DFlashAttention.forward``: QKV split + per-head q/k RMSNorm (+ optional norm
   biases) + RoPE in one ``sgl_kernel_npu`` ``split_qkv_rmsnorm_rope`` call on the
   QKV projection the forward already computed (upstream projects twice on NPU).
   The rotary cos/sin rows are built once per forward, at layer 0, and reused by
   the other layers only while they are handed the very same positions tensor and
   rotary module; any other layer that sees different positions rebuilds them, so
   rows cannot go stale across forwards. Configurations the kernel cannot express
   exactly (non-neox RoPE, rotary variants with their own rotation, norms other than
   RMSNorm, head dims that are not powers of two, 2-D positions) keep the original
   unfused code.
2. ``DFlashWorker.__init__`` accepts "ascend" as draft attention backend;
   ``_append_target_hidden_sequential`` materialises the context K/V through the
   same fused path.
3. ``NPUGraphRunner.replay`` copies ``forward_batch.input_embeds`` into the graph
   buffer for the DFlash draft worker (what CudaGraphRunner.replay does).
4. ``AscendAttnBackend.forward_mtp``: an ENCODER_ONLY layer attends with no mask
   and ``sparse_mode=0``; causal layers make exactly the original call.

The scanner finds the pre-change form in 0.5.11 and 0.5.12.post1; 0.5.13.post1
has the change (upstream); 0.5.10.post1 has no DFlash. Drop this patch once no
supported release predates 0.5.13.
"""

from sgl_accel._guard import SourceCheck
from sgl_accel._registry import Patch, Part, Target
from sgl_accel._rewrite import Rule, walk

DFLASH_MODULE = "sglang.srt.models.dflash"
WORKER_MODULE = "sglang.srt.speculative.dflash_worker"
GRAPH_RUNNER_MODULE = "sglang.srt.hardware_backend.npu.graph_runner.npu_graph_runner"
BACKEND_MODULE = "sglang.srt.hardware_backend.npu.attention.ascend_backend"
KERNEL = "sgl_kernel_npu.norm.split_qkv_rmsnorm_rope:split_qkv_rmsnorm_rope"

# Where later releases keep the pieces (newest first). 0.5.14 replaced the V1 worker by
# DFlashWorkerV2; 0.5.15 moved the draft-backend check into the server-args hook; 0.5.14
# folded NPUGraphRunner.replay's input refresh into NPUGraphRunner.execute.
WORKER_V2_MODULE = "sglang.srt.speculative.dflash_worker_v2"
SPEC_HOOK = ("sglang.srt.arg_groups.speculative_hook", "_resolve_dflash_draft_attention_backend")
CHOICES_MODULE = "sglang.srt.arg_groups.choices"


def _literal_strings(node) -> set:
    import ast

    if isinstance(node, (ast.Tuple, ast.List)):
        return {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return set()


def _accepts_ascend_draft(def_node, reader) -> int:
    """Sites where ``supported_draft_backends`` holds "ascend": a literal tuple in the function,
    or (0.5.20+) the name of sglang's draft-backend choices list, read from arg_groups/choices.py."""
    import ast

    found = 0
    for node in walk(def_node):
        if not (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "supported_draft_backends" for t in node.targets)):
            continue
        value = node.value
        if isinstance(value, ast.Name):
            choices = reader.module(CHOICES_MODULE)
            value = next(
                (
                    n.value
                    for n in (choices.body if choices is not None else [])
                    if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == value.id for t in n.targets)
                ),
                None,
            )
        found += "ascend" in _literal_strings(value)
    return found


ACCEPTS_ASCEND_DRAFT = SourceCheck(
    "supported_draft_backends includes 'ascend'", _accepts_ascend_draft, modules=(CHOICES_MODULE,)
)


def _helpers():
    from sgl_kernel_npu.norm.split_qkv_rmsnorm_rope import split_qkv_rmsnorm_rope

    from sglang.srt.layers.layernorm import RMSNorm
    from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding

    def power_of_two(n) -> bool:
        return n > 0 and n & (n - 1) == 0

    def norm_bias(norm):
        # A plain RMSNorm never adds a bias (whatever attributes it carries); an
        # RMSNorm subclass that carries ``bias`` applies it after the weight, the
        # contract of the kernel's q_bias/k_bias (and of upstream's getattr).
        return None if type(norm) is RMSNorm else getattr(norm, "bias", None)

    def norm_fits(norm, head_dim) -> bool:
        if not isinstance(norm, RMSNorm) or getattr(norm, "variance_size_override", None) is not None:
            return False
        if norm.weight.numel() != head_dim:
            return False
        bias = norm_bias(norm)
        if type(norm) is not RMSNorm and bias is None:
            return False  # a subclass with unknown math
        return bias is None or bias.numel() == head_dim

    def _sgl_accel_dflash_can_fuse(attn, positions) -> bool:
        """Whether split_qkv_rmsnorm_rope computes exactly what the unfused path does."""
        rope = attn.rotary_emb
        kind = type(rope)
        head_dim = attn.head_dim
        if not (
            isinstance(rope, RotaryEmbedding)
            # Rotary variants that only change the cos/sin cache are fine; those with
            # their own rotation or cos/sin layout (mrope, Deepseek, ...) are not.
            and kind.get_cos_sin_with_position is RotaryEmbedding.get_cos_sin_with_position
            and kind.forward_native is RotaryEmbedding.forward_native
            and kind.forward_npu is RotaryEmbedding.forward_npu
            # Older kernel builds are neox-only; interleaved RoPE stays unfused.
            and rope.is_neox_style
            and power_of_two(head_dim)
            and power_of_two(rope.rotary_dim)
            and rope.rotary_dim <= head_dim
            and attn.q_size % attn.kv_size == 0
            and positions.dim() == 1
            and positions.shape[0] > 0
        ):
            return False
        q_norm, k_norm = attn.q_norm, attn.k_norm
        return (
            q_norm.variance_epsilon == k_norm.variance_epsilon
            and norm_fits(q_norm, head_dim)
            and norm_fits(k_norm, head_dim)
        )

    # (positions, rotary module, cos rows, sin rows) of the latest preparation.
    rows = [None, None, None, None]

    def _sgl_accel_dflash_qkv_norm_rope(attn, positions, qkv):
        """(q, k, v) from the packed QKV projection: split, per-head RMSNorm, RoPE."""
        rope = attn.rotary_emb
        # Layer 0 starts every draft forward and every context append: it always
        # rebuilds. Other layers reuse only rows built for these very positions.
        if attn.attn.layer_id == 0 or rows[0] is not positions or rows[1] is not rope:
            rope.get_cos_sin_with_position(positions)
            rows[:] = (positions, rope, rope.position_cos, rope.position_sin)
        q_norm, k_norm = attn.q_norm, attn.k_norm
        q_bias, k_bias = norm_bias(q_norm), norm_bias(k_norm)
        if (q_bias is None) != (k_bias is None):
            # The kernel adds biases iff q_bias is given, then to both q and k: the
            # missing one becomes zeros (never dropped, never a null read).
            if q_bias is None:
                q_bias = k_bias.new_zeros(k_bias.shape)
            else:
                k_bias = q_bias.new_zeros(q_bias.shape)
        return split_qkv_rmsnorm_rope(
            qkv.contiguous(),
            rows[3],
            rows[2],
            attn.q_size,
            attn.kv_size,
            attn.head_dim,
            eps=q_norm.variance_epsilon,
            q_weight=q_norm.weight,
            k_weight=k_norm.weight,
            q_bias=q_bias,
            k_bias=k_bias,
        )

    return {
        "_sgl_accel_dflash_can_fuse": _sgl_accel_dflash_can_fuse,
        "_sgl_accel_dflash_qkv_norm_rope": _sgl_accel_dflash_qkv_norm_rope,
    }


_UNFUSED_QKV = """
    q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
    q, k = apply_qk_norm(q, k, self.q_norm, self.k_norm, self.head_dim)
    q, k = self.rotary_emb(positions, q, k)
"""

_UNFUSED_CTX_KV = """
    k, v = attn.kv_proj_only(ctx_hidden)
    k = attn.apply_k_norm(k)
    k = attn.apply_k_rope(ctx_positions, k)
"""


def _indent(block: str, prefix: str = "    ") -> str:
    import textwrap

    return textwrap.indent(textwrap.dedent(block).strip("\n"), prefix)


_FUSED_QKV = f"""
if _sgl_accel_dflash_can_fuse(self, positions):
    q, k, v = _sgl_accel_dflash_qkv_norm_rope(self, positions, qkv)
else:
{_indent(_UNFUSED_QKV)}
"""

_FUSED_CTX_KV = f"""
if _sgl_accel_dflash_can_fuse(attn, ctx_positions):
    _, k, v = _sgl_accel_dflash_qkv_norm_rope(attn, ctx_positions, attn.qkv_proj(ctx_hidden)[0])
else:
{_indent(_UNFUSED_CTX_KV)}
"""

_FIA_MTP_CALL = """
attn_output, _ = torch.ops.npu.npu_fused_infer_attention_score(
    query,
    k_cache,
    v_cache,
    block_table=self.forward_metadata.block_tables,
    block_size=self.page_size,
    num_heads=layer.tp_q_head_num,
    num_key_value_heads=layer.tp_k_head_num,
    input_layout="TND",
    atten_mask={mask},
    scale=layer.scaling,
    actual_seq_lengths=actual_seq_lengths,
    actual_seq_lengths_kv=actual_seq_lengths_kv,
    sparse_mode={mode},
)
"""

_MTP_CAUSAL = _FIA_MTP_CALL.format(mask="self.mtp_mask", mode="3")

_MTP_BY_ATTN_TYPE = f"""
if layer.attn_type == AttentionType.ENCODER_ONLY:
    # DFlash's draft block attends to all of its KV: no mask, no sparsity.
{_indent(_FIA_MTP_CALL.format(mask="None", mode="0"))}
else:
{_indent(_MTP_CAUSAL)}
"""


PATCH = Patch(
    name="ascend-dflash",
    upstream_pr="#23122",
    kind="feature",
    summary=(
        "DFlash speculative decoding on Ascend: fused split_qkv_rmsnorm_rope in the draft "
        "attention, 'ascend' draft backend, draft input embeddings on NPU graph replay, "
        "non-causal MTP attention for ENCODER_ONLY layers"
    ),
    hardware=("ascend",),
    kernels=(KERNEL,),
    releases=">=0.5.11",
    parts=[
        Part(
            "dflash-npu",
            [
                Target(
                    DFLASH_MODULE,
                    "DFlashAttention.forward",
                    rules=[
                        Rule(
                            "split + q/k RMSNorm + RoPE in one split_qkv_rmsnorm_rope call",
                            find=_UNFUSED_QKV,
                            replace=_FUSED_QKV,
                        ),
                    ],
                    upstream=["self.forward_prepare_npu(__positions, __hidden)"],
                ),
                Target(
                    WORKER_MODULE,
                    "DFlashWorker.__init__",
                    rules=[
                        Rule(
                            "accept 'ascend' as DFlash draft attention backend",
                            find='supported_draft_backends = ("flashinfer", "fa3", "fa4", "triton")',
                            replace='supported_draft_backends = ("flashinfer", "fa3", "fa4", "triton", "ascend")',
                        ),
                    ],
                    upstream=[ACCEPTS_ASCEND_DRAFT],
                    moved=[SPEC_HOOK, (WORKER_V2_MODULE, "DFlashWorkerV2.__init__")],
                ),
                Target(
                    WORKER_MODULE,
                    "DFlashWorker._append_target_hidden_sequential",
                    rules=[
                        Rule(
                            "context K/V through the fused split/norm/RoPE kernel",
                            find=_UNFUSED_CTX_KV,
                            replace=_FUSED_CTX_KV,
                        ),
                    ],
                    upstream=["__attn.forward_prepare_npu(__positions, __hidden)"],
                    moved=[(WORKER_V2_MODULE, "DFlashWorkerV2._append_target_hidden_sequential")],
                ),
                Target(
                    GRAPH_RUNNER_MODULE,
                    "NPUGraphRunner.replay",
                    rules=[
                        Rule(
                            "refresh the draft block's input embeddings before the graph replays",
                            find="""
                                self.buffers.input_ids[: self.raw_num_token].copy_(forward_batch.input_ids)
                                self.buffers.positions[: self.raw_num_token].copy_(forward_batch.positions)
                            """,
                            replace="""
                                self.buffers.input_ids[: self.raw_num_token].copy_(forward_batch.input_ids)
                                self.buffers.positions[: self.raw_num_token].copy_(forward_batch.positions)
                                if (
                                    forward_batch.input_embeds is not None
                                    and self.model_runner.is_draft_worker
                                    and self.model_runner.spec_algorithm.is_dflash()
                                ):
                                    self.buffers.input_embeds[: self.raw_num_token].copy_(forward_batch.input_embeds)
                            """,
                        ),
                    ],
                    upstream=["self.buffers.input_embeds[: self.raw_num_token].copy_(forward_batch.input_embeds)"],
                    moved=[(GRAPH_RUNNER_MODULE, "NPUGraphRunner.execute")],
                ),
                Target(
                    BACKEND_MODULE,
                    "AscendAttnBackend.forward_mtp",
                    rules=[
                        Rule(
                            "ENCODER_ONLY layers: no mask, sparse_mode 0; causal layers unchanged",
                            find=_MTP_CAUSAL,
                            replace=_MTP_BY_ATTN_TYPE,
                        ),
                    ],
                    upstream=["layer.attn_type == AttentionType.ENCODER_ONLY"],
                ),
            ],
        )
    ],
    helpers=_helpers,
)
