"""Ascend FIA prefill that attends to each request's cached prefix (upstream #22020).

What it changes: with ``ASCEND_USE_FIA=1``, ``AscendAttnBackend.forward_extend`` of
sglang 0.5.6.post1 to 0.5.11 (non-MLA, non-CP branch) calls
``npu_fused_infer_attention_score`` once per request, in BSND layout, over that
request's *new* q/k/v only. A request with a cached prefix (every chunk after the
first under chunked prefill, every radix-cache hit) therefore attends to its new
tokens alone and its outputs are wrong. The rewrite makes that branch, whenever
some request of the batch has a prefix, one paged call over the KV cache:

* query in TND layout, trimmed to the batch's real tokens (padding rows are cut
  before the call and come back as zeros after it, as upstream does);
* ``block_table`` = the backend's per-request page table, ``block_size`` = its page size;
* ``actual_seq_lengths`` = cumulative query ends, ``actual_seq_lengths_kv`` = each
  request's whole length (prefix + new tokens), both plain Python int lists;
* ``sparse_mode=3`` with the backend's 2048x2048 mask: causal aligned to the
  bottom-right corner, so new token i of a request sees its prefix and new tokens <= i.

When no request has a prefix the release's per-request call runs unchanged: it is
correct there, runs the same ops and kernel calls as before and gives the same bits
(the tests count them); the only addition is ``any()`` over the batch's prefix
lengths, the release's own field for that question. No NPU measurement says the
paged call is at least as fast on such batches, so it is not used there.

Why: ``ASCEND_USE_FIA=1`` is what Ascend context parallelism and graph mode need, so
those deployments get wrong prefill outputs as soon as chunked prefill or the radix
cache is on.

Upstream: open PR #22020 describes the defect; 0.5.12.post1 ships the corrected
form (one paged TND call, padded tokens trimmed), which the ``upstream`` marker
below recognises.

Releases: the scanner finds the per-request form in 0.5.6.post1 to 0.5.11 (see the
compatibility matrix); the test suite runs the patch on 0.5.10.post1 and 0.5.11,
and its cases were run once on each of 0.5.6.post1, 0.5.6.post2, 0.5.7, 0.5.8,
0.5.8.post1, 0.5.9 and 0.5.10. 0.5.12 and later report ``upstream``. 0.5.6 and
earlier keep the backend in ``sglang.srt.layers.attention`` and are not covered.
Drop this patch once no supported release predates 0.5.12.
"""

import ast

from sgl_accel._registry import Patch, Part, Target
from sgl_accel._rewrite import Custom, Probe, Rule, dotted_name, statement_lists, walk

BACKEND_MODULE = "sglang.srt.hardware_backend.npu.attention.ascend_backend"
FIA_OP = "npu_fused_infer_attention_score"


def _helpers():
    from itertools import accumulate

    def _sgl_accel_fia_paged_lengths(forward_batch, metadata):
        """(cumulative query ends, per-request KV lengths with the prefix) as Python int lists."""
        q_ends = list(accumulate(int(n) for n in forward_batch.extend_seq_lens_cpu))
        return q_ends, [int(n) for n in metadata.seq_lens_cpu_int.tolist()]

    return {"_sgl_accel_fia_paged_lengths": _sgl_accel_fia_paged_lengths}


# The release's per-request branch, statement for statement.
_PER_REQUEST = '''
"""FIA will support multi-bs in the later version of CANN"""
q = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
attn_output = torch.empty(
    (q.size(0), layer.tp_q_head_num, layer.v_head_dim),
    device=q.device,
    dtype=q.dtype,
)
q_len_offset = 0
for q_len in forward_batch.extend_seq_lens_cpu:
    attn_output[q_len_offset : q_len_offset + q_len] = (
        torch.ops.npu.npu_fused_infer_attention_score(
            q[None, q_len_offset : q_len_offset + q_len],
            k[None, q_len_offset : q_len_offset + q_len],
            v[None, q_len_offset : q_len_offset + q_len],
            num_heads=layer.tp_q_head_num,
            num_key_value_heads=layer.tp_k_head_num,
            input_layout="BSND",
            atten_mask=self.fia_mask.unsqueeze(0),
            sparse_mode=3 if q_len != 1 else 0,
            scale=layer.scaling,
            next_tokens=0,
        )[0]
    )
    q_len_offset += q_len
attn_output = attn_output.view(
    -1, layer.tp_q_head_num * layer.v_head_dim
)
'''

# One paged TND call over the KV cache; the lengths include every request's prefix.
_PAGED = """
fia_q_ends, fia_kv_lens = _sgl_accel_fia_paged_lengths(forward_batch, self.forward_metadata)
q = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
fia_num_tokens = q.shape[0]
attn_output, _ = torch.ops.npu.npu_fused_infer_attention_score(
    q[: fia_q_ends[-1]],
    k_cache.view(-1, self.page_size, layer.tp_k_head_num * layer.qk_head_dim),
    v_cache.view(-1, self.page_size, layer.tp_v_head_num * layer.v_head_dim),
    block_table=self.forward_metadata.block_tables,
    block_size=self.page_size,
    num_heads=layer.tp_q_head_num,
    num_key_value_heads=layer.tp_k_head_num,
    input_layout="TND",
    atten_mask=self.fia_mask,
    sparse_mode=3,
    scale=layer.scaling,
    actual_seq_lengths=fia_q_ends,
    actual_seq_lengths_kv=fia_kv_lens,
)
attn_output = attn_output.view(-1, layer.tp_q_head_num * layer.v_head_dim)
if attn_output.shape[0] < fia_num_tokens:
    # Padding rows (beyond the batch's real tokens) were not computed: zeros.
    attn_output = torch.cat(
        [attn_output, attn_output.new_zeros(fia_num_tokens - attn_output.shape[0], attn_output.shape[1])]
    )
"""


def _indent(block: str) -> str:
    import textwrap

    return textwrap.indent(textwrap.dedent(block).strip("\n"), "    ")


# The paged call when some request has a cached prefix, else the per-request body.
# ``any(extend_prefix_lens_cpu)`` is the release's own test for a cached prefix
# (its MLA branch and init_forward_metadata ask ``sum(...) > 0``).
_BY_PREFIX = f"""
if any(forward_batch.extend_prefix_lens_cpu):
{_indent(_PAGED)}
else:
{_indent(_PER_REQUEST)}
"""


def _is_fia_branch(node) -> bool:
    return isinstance(node, ast.If) and dotted_name(node.test) == "self.use_fia"


def _rewrite_fia_branch(func) -> int:
    """Apply the rewrite inside ``if self.use_fia:`` bodies only: the MLA branch has the
    same per-request statements (used there only without a prefix) and stays as it is."""
    rule = Rule("per-request FIA body", find=_PER_REQUEST, replace=_BY_PREFIX)
    return sum(rule.apply(node) for node in _fia_branches(func))


def _fia_branches(func) -> list:
    """The ``if self.use_fia:`` statements of ``func``, at any depth."""
    return [node for block in statement_lists(func) for node in block if _is_fia_branch(node)]


def _paged_prefill_calls(func) -> int:
    """Upstream marker: FIA calls made directly in an ``if self.use_fia:`` body over the
    paged KV cache in TND layout with per-request KV lengths (0.5.12.post1's form).
    Keyword order and the op's namespace (``torch_npu`` / ``torch.ops.npu``) do not matter."""
    hits = 0
    for node in _fia_branches(func):
        for statement in node.body:
            for call in walk(statement):
                if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == FIA_OP):
                    continue
                keywords = {k.arg: k.value for k in call.keywords}
                layout = keywords.get("input_layout")
                if (
                    "block_table" in keywords
                    and "actual_seq_lengths_kv" in keywords
                    and isinstance(layout, ast.Constant)
                    and layout.value == "TND"
                ):
                    hits += 1
    return hits


PATCH = Patch(
    name="ascend-fia-extend-prefix",
    upstream_pr="#22020",
    kind="fix",
    summary=(
        "Ascend FIA prefill (ASCEND_USE_FIA=1) attends to each request's cached prefix: one paged "
        "TND call over the KV cache when a request has a prefix (chunked prefill, radix-cache hits)"
    ),
    hardware=("ascend",),
    releases=">=0.5.6.post1",
    parts=[
        Part(
            "fia-extend",
            [
                Target(
                    BACKEND_MODULE,
                    "AscendAttnBackend.forward_extend",
                    rules=[
                        Custom(
                            "FIA prefill branch: per-request call over the new tokens -> one paged TND "
                            "call over prefix + new tokens when some request has a cached prefix",
                            _rewrite_fia_branch,
                        ),
                    ],
                    upstream=[Probe("paged TND FIA call in the FIA prefill branch", _paged_prefill_calls)],
                )
            ],
        )
    ],
    helpers=_helpers,
)
