"""Ascend context-parallel prefill with padded input: the right KV span and a wide enough block table.

What goes wrong (found by reading and simulating the release code, confirmed by
``tests/test_patch_ascend_cp_padding.py`` on the real functions). Before a CP prefill the
batch's tokens are padded (``ForwardBatch.prepare_mlp_sync_batch``: to a multiple of the CP
size, and to the largest DP rank's count in DP max-len padding); ``Qwen3MoeForCausalLM.forward``
hands the padded count to ``prepare_context_parallel_metadata``, which treats all of it as the
extend part of the one sequence.

1. Cached prefix + padding (0.5.11, 0.5.12.post1). The prefix is derived as ``seq_len -
   padded count``: ``pad`` tokens too short. Every query then attends a KV span that ends
   ``pad`` tokens early (it misses its own key and the keys just before it), and a prefix
   shorter than the padding is clamped to 0.
2. Block-table width (0.5.11, 0.5.12.post1, 0.5.13.post1). The padding tokens are the tail of
   the last sequence, so that sequence's last chunk has KV length ``seq_len + pad``; the block
   table ``AscendAttnBackend.init_forward_metadata`` builds covers only ``max(seq_lens)``
   tokens. When the padding crosses a page boundary FIA is told to read a page the table does
   not have (out of bounds on the device; the test bed's FIA refuses it). 0.5.11/0.5.12.post1
   hit it when the padding exceeds the prefix; once 1. is fixed (and in 0.5.13.post1, where
   upstream #23269 adds the padding to the last sequence) whenever the padding crosses a page.

How:
* part ``cp-metadata`` (``Qwen3MoeForCausalLM.forward`` + ``prepare_context_parallel_metadata``,
  both or neither): the caller also passes ``extend_seqs_len`` (upstream #23269's argument);
  the builder adds the padding to the last sequence (its ``seq_len`` and its extend length),
  so the prefix is the real one. The builder is the per-sequence zigzag split of #23269:
  every sequence cut into ``2 * cp_size`` blocks on its own, rank r holding every sequence's
  block r then every sequence's block ``2cp-1-r``. The object it returns is a subclass of the
  release's ``ContextParallelMetadata``: every release field holds exactly the release's value
  for one sequence (the scalar ``kv_len_prev`` ... that CUDA, MUSA, the NSA indexer and
  ``do_cp_attn_fia`` read; -1 when there are several sequences, which only
  ``ascend-cp-prefill-batch`` allows), plus #23269's per-sequence fields
  (``actual_seq_q_prev_list``, ``kv_len_prev_list``, ``total_q_prev_tokens``, ...).
  ``max_rank_len`` is the largest rank share (equal to the release's ``ceil(total/cp)`` for
  one sequence). Callers that pass no extend lengths (DeepSeek NSA) get the release's
  computation unchanged.
* part ``block-table`` (``AscendAttnBackend.init_forward_metadata``): in a CP extend
  (``attn_cp_size > 1``) the block table covers ``max(seq_lens) + padding`` tokens; otherwise
  nothing changes. Widening reads ``req_to_token`` columns that exist (the pool's rows are
  ``max_context_len`` wide); the extra pages are only ever read by padding queries.

Upstream: the prefix part is fixed by #23269 (in 0.5.13); the block-table overrun is not fixed
upstream as of 0.5.13.post1. Releases, from the scanner: 0.5.11 and 0.5.12.post1 apply both
parts; 0.5.13.post1 has ``cp-metadata`` upstream and applies ``block-table`` (the structural
guard decides, there is no release cap). Drop the ``cp-metadata`` part with 0.5.12.post1, the
``block-table`` part once upstream sizes the table for the padding.

Not checked on an NPU: HCCL and the real FIA kernel; the test bed runs the release's CP path
on CPU with gloo and its FIA reference (see tests/test_cp_prefill_multiprocess.py).
"""

from sgl_accel._registry import Part, Patch, Target
from sgl_accel._rewrite import Custom, Rule

QWEN3_MOE_MODULE = "sglang.srt.models.qwen3_moe"
CP_UTILS_MODULE = "sglang.srt.layers.utils.cp_utils"
BACKEND_MODULE = "sglang.srt.hardware_backend.npu.attention.ascend_backend"
NAME = "ascend-cp-padding"

# The per-sequence fields of upstream #23269, added to the release's metadata class.
PER_SEQUENCE_FIELDS = (
    ("cu_seqlens_q_prev_tensor", None),
    ("cu_seqlens_q_next_tensor", None),
    ("total_q_prev_tokens", 0),
    ("total_q_next_tokens", 0),
    ("max_seqlen_q_prev", 0),
    ("max_seqlen_q_next", 0),
    ("kv_len_prev_list", None),
    ("kv_len_next_list", None),
    ("actual_seq_q_prev_list", None),
    ("actual_seq_q_next_list", None),
    ("bs", 1),
)
# Statements of the release's builder that the rewrite replaces, first and last.
_FIRST = "kv_len = torch.tensor(kv_len)"
_LAST = "return attn_cp_metadata"
_RELEASE_ARGS = ["kv_len", "cp_rank", "cp_size", "seqs_len"]


def _delegate_builder(func) -> int:
    """prepare_context_parallel_metadata: accept ``extend_seqs_len=`` / ``device=`` and build with the helper.

    The release body from ``kv_len = torch.tensor(kv_len)`` to ``return attn_cp_metadata`` is the
    batch-1 computation; it becomes one call. Anything else in the def (the round-robin early
    return, the docstring) stays. Returns 0 (drifted) unless the def has exactly that shape.
    """
    import ast

    args = func.args
    if [a.arg for a in args.args] != _RELEASE_ARGS or args.defaults or args.kwonlyargs or args.vararg or args.kwarg:
        return 0
    dumps = [ast.unparse(s) for s in func.body]
    if _FIRST not in dumps or dumps[-1] != _LAST or "bs_per_cp_group = 1" not in dumps:
        return 0
    start = dumps.index(_FIRST)
    replacement = ast.parse(
        "from sglang.srt.layers.attention.nsa.utils import is_nsa_enable_prefill_cp\n"
        "return _sgl_accel_build_cp_metadata(ContextParallelMetadata, kv_len, cp_rank, cp_size, seqs_len,"
        " is_nsa_enable_prefill_cp(), **options)"
    ).body
    site = func.body[start]
    for node in replacement:
        for sub in ast.walk(node):
            if "lineno" in sub._attributes:
                sub.lineno, sub.col_offset = site.lineno, site.col_offset
                sub.end_lineno, sub.end_col_offset = site.lineno, site.col_offset
    func.body[start:] = replacement
    # Upstream #23269's keywords extend_seqs_len= and device= arrive as **options (the loader keeps
    # the original's __defaults__, so new parameters cannot carry defaults of their own).
    args.kwarg = ast.copy_location(ast.arg("options"), args.args[-1])
    args.kwarg.end_lineno, args.kwarg.end_col_offset = args.args[-1].end_lineno, args.args[-1].end_col_offset
    return 1


def _helpers():
    import dataclasses
    from itertools import accumulate

    import torch

    per_sequence_class = {}

    def metadata_class(release_class):
        """The release's ContextParallelMetadata with #23269's per-sequence fields added."""
        if release_class not in per_sequence_class:
            per_sequence_class[release_class] = dataclasses.make_dataclass(
                release_class.__name__,
                [(name, object, dataclasses.field(default=default)) for name, default in PER_SEQUENCE_FIELDS],
                bases=(release_class,),
                namespace={"__module__": release_class.__module__, "__qualname__": release_class.__qualname__},
            )
        return per_sequence_class[release_class]

    def sequences(kv_len, seqs_len, extend_seqs_len):
        """(extend lengths, prefix lengths): padding is the tail of the last sequence."""
        total = int(kv_len)
        if extend_seqs_len is None:
            # One sequence, exactly as the release derives it (callers without extend lengths).
            extend = [total]
            seqs = [int(seqs_len[0])] if seqs_len is not None and len(seqs_len) == 1 else None
        else:
            extend = [int(n) for n in extend_seqs_len]
            seqs = [int(n) for n in seqs_len] if seqs_len is not None and len(seqs_len) == len(extend) else None
            pad = total - sum(extend)
            if pad > 0:
                extend[-1] += pad
                if seqs is not None:
                    seqs[-1] += pad
        prefix = [max(s - e, 0) for s, e in zip(seqs, extend)] if seqs is not None else [0] * len(extend)
        return extend, prefix

    def _sgl_accel_build_cp_metadata(release_class, kv_len, cp_rank, cp_size, seqs_len, nsa_mode, extend_seqs_len=None, device="cuda"):
        extend, prefix = sequences(kv_len, seqs_len, extend_seqs_len)
        bs, segments = len(extend), 2 * cp_size
        blocks = []
        for n in extend:
            base, extra = divmod(n, segments)
            blocks.append([base + (1 if i < extra else 0) for i in range(segments)])
        prev_block, next_block = cp_rank, segments - 1 - cp_rank
        # All-gather order: [rank0 prevs, rank0 nexts, rank1 prevs, ...], one piece per sequence.
        gathered = []
        for r in range(cp_size):
            gathered += [(s, r) for s in range(bs)] + [(s, segments - 1 - r) for s in range(bs)]
        where = {piece: i for i, piece in enumerate(gathered)}
        per_rank = [sum(b[r] + b[segments - 1 - r] for b in blocks) for r in range(cp_size)]

        q_prev = [b[prev_block] for b in blocks]
        q_next = [b[next_block] for b in blocks]
        # A chunk's queries are the tail of the KV range they attend; NSA adds the prefix itself.
        offsets = [0] * bs if nsa_mode else prefix
        kv_prev = [p + sum(b[: prev_block + 1]) for p, b in zip(offsets, blocks)]
        kv_next = [p + sum(b[: next_block + 1]) for p, b in zip(offsets, blocks)]
        cu_prev, cu_next = [0, *accumulate(q_prev)], [0, *accumulate(q_next)]
        as_tensor = lambda values: torch.tensor(values, device=device, dtype=torch.int32)  # noqa: E731
        one = bs == 1  # the release's scalar fields describe exactly one sequence
        return metadata_class(release_class)(
            split_list=[n for b in blocks for n in b],
            max_rank_len=[max(per_rank)] * cp_size,
            zigzag_index=[s * segments + prev_block for s in range(bs)] + [s * segments + next_block for s in range(bs)],
            per_rank_actual_token=per_rank,
            reverse_split_len=[blocks[s][b] for s, b in gathered],
            cp_reverse_index=[where[(s, b)] for s in range(bs) for b in range(segments)],
            kv_len_prev=kv_prev[0] if one else -1,
            kv_len_next=kv_next[0] if one else -1,
            actual_seq_q_prev=q_prev[0] if one else -1,
            actual_seq_q_next=q_next[0] if one else -1,
            kv_len_prev_tensor=as_tensor(kv_prev),
            kv_len_next_tensor=as_tensor(kv_next),
            actual_seq_q_prev_tensor=as_tensor(q_prev),
            actual_seq_q_next_tensor=as_tensor(q_next),
            total_seq_lens=torch.tensor(int(kv_len)),
            cu_seqlens_q_prev_tensor=as_tensor(cu_prev),
            cu_seqlens_q_next_tensor=as_tensor(cu_next),
            total_q_prev_tokens=cu_prev[-1],
            total_q_next_tokens=cu_next[-1],
            max_seqlen_q_prev=max(q_prev),
            max_seqlen_q_next=max(q_next),
            kv_len_prev_list=kv_prev,
            kv_len_next_list=kv_next,
            actual_seq_q_prev_list=q_prev,
            actual_seq_q_next_list=q_next,
            bs=bs,
        )

    def _sgl_accel_cp_padding_tokens(backend, forward_batch):
        """Padding tokens of a CP extend batch (the tail of its last sequence); 0 otherwise."""
        if backend.attn_cp_size <= 1 or not forward_batch.forward_mode.is_context_parallel_extend():
            return 0
        extend = forward_batch.extend_seq_lens_cpu
        if extend is None or forward_batch.input_ids is None:
            return 0
        return max(int(forward_batch.input_ids.shape[0]) - int(sum(extend)), 0)

    return {
        "_sgl_accel_build_cp_metadata": _sgl_accel_build_cp_metadata,
        "_sgl_accel_cp_padding_tokens": _sgl_accel_cp_padding_tokens,
    }


PATCH = Patch(
    name=NAME,
    upstream_pr="#23269 / none",  # prefix part: #23269; block-table part: not fixed upstream
    kind="fix",
    summary=(
        "Ascend CP prefill with padded input: the cached prefix is the real one (not seq_len minus the "
        "padded count) and the block table covers the padding; CP metadata also carries per-sequence fields"
    ),
    hardware=("ascend",),
    releases=">=0.5.11",  # no Ascend CP attention before 0.5.11
    parts=[
        Part(
            "cp-metadata",
            [
                Target(
                    QWEN3_MOE_MODULE,
                    "Qwen3MoeForCausalLM.forward",
                    rules=[
                        Rule(
                            "pass the extend lengths to the CP metadata builder",
                            find="prepare_context_parallel_metadata(len(input_ids), self.attn_cp_rank, self.attn_cp_size, forward_batch.seq_lens_cpu.tolist())",
                            replace=(
                                "prepare_context_parallel_metadata(len(input_ids), self.attn_cp_rank, self.attn_cp_size, "
                                "forward_batch.seq_lens_cpu.tolist(), extend_seqs_len=forward_batch.extend_seq_lens_cpu)"
                            ),
                        )
                    ],
                    upstream=["prepare_context_parallel_metadata(__a, __b, __c, __d, extend_seqs_len=__e)"],
                ),
                Target(
                    CP_UTILS_MODULE,
                    "prepare_context_parallel_metadata",
                    rules=[Custom("build per-sequence metadata, padding as the tail of the last sequence", _delegate_builder)],
                    upstream=["pad_len = int(kv_len) - sum(extend_seqs_len)"],
                ),
            ],
        ),
        Part(
            "block-table",
            [
                Target(
                    BACKEND_MODULE,
                    "AscendAttnBackend.init_forward_metadata",
                    rules=[
                        Rule(
                            "block table wide enough for the CP padding tokens",
                            find="seq_lens_max = forward_batch.seq_lens.max()",
                            replace="seq_lens_max = forward_batch.seq_lens.max() + _sgl_accel_cp_padding_tokens(self, forward_batch)",
                        )
                    ],
                )
            ],
        ),
    ],
    helpers=_helpers,
)
