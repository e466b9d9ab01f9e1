"""Ascend context-parallel FIA attention for batch > 1 (upstream #26705).

``AscendAttnBackend.do_cp_attn_fia`` (0.5.11, 0.5.12.post1) splits the rank-local
query with ``torch.chunk(q, 2)`` and hands the FIA kernel the scalar metadata fields
``actual_seq_q_prev`` / ``kv_len_prev`` (and ``_next``). Upstream #23269 made
``ContextParallelMetadata`` per-sequence (``actual_seq_q_prev_list``,
``kv_len_prev_list``, ``total_q_prev_tokens``, ...; scalars removed) and lays the
local tokens out as ``[all sequences' prev blocks, all sequences' next blocks]``.
With that metadata the old code raises AttributeError, and even with the fields
present its midpoint split is wrong for batch > 1. #26705 splits at
``total_q_prev_tokens`` and passes cumulative query lengths (TND) and
per-sequence KV lengths (paged KV).

This rewrite reads the lengths through ``_sgl_accel_cp_lengths``, which accepts
both metadata forms: the per-sequence lists, and the scalar batch-1 form of the
releases (where it reproduces the original call exactly). Lengths go to the
kernel as plain Python int lists (the op's arguments are ``SymInt[]``; upstream's
first commit passed NumPy arrays from ``np.cumsum``).

Where it applies (decided by structure: the scalar-reading ``do_cp_attn_fia``): 0.5.11 and
0.5.12.post1. 0.5.13 to 0.5.22 contain #26705 (upstream); 0.5.23 moved the split into the CP-v2
strategy (``ZigzagCPStrategy.run_attention`` splits at ``total_q_prev_tokens`` and passes
per-sequence lengths; ``do_cp_attn_fia`` only supplies the FIA call), also upstream. Design:
the rewrite is correct for both metadata forms, so it applies on 0.5.11/0.5.12.post1 by
default. With the release's scalar metadata (one sequence; ``can_cp_split`` forces batch 1)
the kernel receives exactly the release's arguments and the output is bit-identical (tested);
with the per-sequence metadata that ``ascend-cp-padding`` builds it serves batches of several
sequences, which the opt-in ``ascend-cp-prefill-batch`` admits. No dependency is declared: the
opt-in patch checks, before batching, that this rewrite is in place. Before 0.5.11 there is no
Ascend CP attention. Drop this patch once no supported install predates #26705.
"""

from sgl_accel._guard import SourceCheck
from sgl_accel._registry import Patch, Part, Target
from sgl_accel._rewrite import Rule

_BACKEND_MODULE = "sglang.srt.hardware_backend.npu.attention.ascend_backend"
# 0.5.23: the zigzag CP strategy owns the prev/next split and the per-sequence lengths.
_ZIGZAG_MODULE = "sglang.srt.layers.cp.zigzag"

# The per-sequence fields the rewritten code reads (upstream #23269).
PER_SEQUENCE_FIELDS = (
    "actual_seq_q_prev_list",
    "actual_seq_q_next_list",
    "kv_len_prev_list",
    "kv_len_next_list",
    "total_q_prev_tokens",
)
# The scalar (batch-1) fields the unfixed do_cp_attn_fia reads.
SCALAR_FIELDS = ("actual_seq_q_prev", "actual_seq_q_next", "kv_len_prev", "kv_len_next")


def _helpers():
    from collections import namedtuple
    from itertools import accumulate

    CpLengths = namedtuple("CpLengths", "q_split q_prev_cum q_next_cum kv_prev kv_next")

    def _sgl_accel_cp_lengths(cp_meta):
        """FIA length arguments for one CP rank, from either metadata form.

        Local tokens are [prev blocks of every sequence, next blocks of every
        sequence]; TND wants cumulative query ends, paged KV per-sequence lengths.
        """
        q_prev = getattr(cp_meta, "actual_seq_q_prev_list", None)
        if q_prev is not None:
            q_prev = [int(n) for n in q_prev]
            q_next = [int(n) for n in cp_meta.actual_seq_q_next_list]
            kv_prev = [int(n) for n in cp_meta.kv_len_prev_list]
            kv_next = [int(n) for n in cp_meta.kv_len_next_list]
            split = int(cp_meta.total_q_prev_tokens)
        else:
            # Scalar metadata of the releases: exactly one sequence.
            q_prev = [int(cp_meta.actual_seq_q_prev)]
            q_next = [int(cp_meta.actual_seq_q_next)]
            kv_prev = [int(cp_meta.kv_len_prev)]
            kv_next = [int(cp_meta.kv_len_next)]
            split = q_prev[0]
        q_prev_cum = list(accumulate(q_prev))
        if q_prev_cum and q_prev_cum[-1] != split:
            # A wrong split would silently pair queries with other sequences' KV.
            raise ValueError(
                f"context-parallel metadata is inconsistent: total_q_prev_tokens={split} "
                f"but the per-sequence prev lengths sum to {q_prev_cum[-1]}"
            )
        return CpLengths(split, q_prev_cum, list(accumulate(q_next)), kv_prev, kv_next)

    return {"_sgl_accel_cp_lengths": _sgl_accel_cp_lengths}


def _split_by_cp_strategy(def_node, reader) -> int:
    """do_cp_attn_fia hands q to the CP strategy's run_attention, and the zigzag strategy's
    run_attention splits at total_q_prev_tokens with per-sequence cumulative lengths."""
    import ast

    calls = sum(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "run_attention"
        for n in ast.walk(def_node)
    )
    strategy = reader.find(_ZIGZAG_MODULE, "ZigzagCPStrategy.run_attention")
    if not calls or strategy is None:
        return 0
    text = ast.unparse(strategy)
    return calls if "meta.total_q_prev_tokens" in text and "cu_seqlens_q_prev_tensor" in text else 0


_SPLIT_BY_CP_STRATEGY = SourceCheck(
    "the CP strategy's run_attention splits at total_q_prev_tokens (layers/cp/zigzag.py)",
    _split_by_cp_strategy,
    modules=(_ZIGZAG_MODULE,),
)

PATCH = Patch(
    name="ascend-cp-attn-batch",
    upstream_pr="#26705",
    kind="fix",
    summary=(
        "Ascend CP attention (FIA) correct for batch > 1: split the local query at total_q_prev_tokens, "
        "pass cumulative query and per-sequence KV lengths as int lists (identical call for one sequence)"
    ),
    hardware=("ascend",),
    releases=">=0.5.11",
    parts=[
        Part(
            "cp-attn-fia",
            [
                Target(
                    _BACKEND_MODULE,
                    "AscendAttnBackend.do_cp_attn_fia",
                    rules=[
                        Rule(
                            "split the local query at the prev/next boundary of the metadata",
                            find="""
                                cp_meta = forward_batch.attn_cp_metadata
                                q_prev, q_next = torch.chunk(q, 2, dim=0)
                            """,
                            replace="""
                                cp_meta = forward_batch.attn_cp_metadata
                                cp_lens = _sgl_accel_cp_lengths(cp_meta)
                                q_prev, q_next = q[: cp_lens.q_split], q[cp_lens.q_split :]
                            """,
                        ),
                        Rule(
                            "prev chunk: cumulative query lengths",
                            find="[cp_meta.actual_seq_q_prev]",
                            replace="cp_lens.q_prev_cum",
                        ),
                        Rule(
                            "prev chunk: per-sequence KV lengths",
                            find="[cp_meta.kv_len_prev]",
                            replace="cp_lens.kv_prev",
                        ),
                        Rule(
                            "next chunk: cumulative query lengths",
                            find="[cp_meta.actual_seq_q_next]",
                            replace="cp_lens.q_next_cum",
                        ),
                        Rule(
                            "next chunk: per-sequence KV lengths",
                            find="[cp_meta.kv_len_next]",
                            replace="cp_lens.kv_next",
                        ),
                    ],
                    upstream=[
                        "__meta.total_q_prev_tokens",
                        "__meta.actual_seq_q_prev_list",
                        "__meta.kv_len_prev_list",
                        _SPLIT_BY_CP_STRATEGY,
                    ],
                )
            ],
        )
    ],
    helpers=_helpers,
)
