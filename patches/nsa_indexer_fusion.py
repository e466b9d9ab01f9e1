"""Fewer kernels and copies in the NSA indexer (upstream #22232).

What it changes, in ``sglang.srt.layers.attention.nsa.nsa_indexer.Indexer``:

* part ``compile-head-gates`` (ROCm): ``_project_and_scale_head_gates`` and
  ``_get_logits_head_gate`` carry ``@torch.compile(dynamic=True) if not _is_hip
  else lambda f: f``, so on ROCm their projection scaling and gate products run
  as separate element-wise kernels. The decorator becomes plain
  ``torch.compile(dynamic=True)``, as on CUDA, and inductor fuses them.
* part ``rope-writeback`` (CUDA and ROCm): ``_get_q_k_bf16`` and ``_get_k_bf16``
  write the RoPE result back with ``query[..., :r] = q_rope.clone()``: a clone
  kernel plus a copy kernel per tensor, even when the RoPE kernel already
  rotated ``query`` in place and hands back the very view it was given. Each
  write-back becomes ``_sgl_accel_write_back(dst, src)``: nothing when ``src`` is
  ``dst`` viewed the same way (in-place RoPE), otherwise one ``copy_``.

Better than upstream: upstream skips the copy when ``src.data_ptr() ==
dst.data_ptr()``, which also skips a view that starts at the same address but
has other sizes or strides (its elements are not the destination's). Here the
skip needs the same storage, storage offset, sizes, strides and dtype. A source
that shares the destination's memory without being that view (no RoPE path of
the releases produces one) still gets the snapshot the original's ``.clone()``
gave it, since ``copy_`` between overlapping views reads elements it already
overwrote. While torch.compile traces, storage identity is not observable, so
the helper always copies there (functionalization reads a snapshot, and a view
copied onto itself is a no-op); upstream added such an ``is_compiling()`` guard
only in 0.5.13.

Releases: the four targets have the pre-change shape in 0.5.10 and 0.5.10.post1
(applies). 0.5.11 and 0.5.12.post1 contain #22232 (``upstream``, per part).
0.5.13 moved the indexer to ``layers/attention/dsa/dsa_indexer.py`` (already
changed) and left ``nsa/nsa_indexer.py`` as a re-export shim that DeepSeek/GLM
no longer import, so each target names dsa_indexer as its ``moved`` place and 0.5.13+
report ``upstream`` from there. Before 0.5.10 the indexer exists in an older form
the patch was not written for (``older-form`` in the matrix): 0.5.8 and 0.5.9 have the
conditional head-gate decorator but write RoPE back with one plain copy (no
``.clone()``); 0.5.3.post3 to 0.5.7 compile the head gate on every platform and also
write back without a clone. They are outside the range.

Not taken from 0.5.11: its other indexer changes (bf16 ``weights_proj`` on ROCm,
the aiter tuple input), which belong to other upstream changes.

Drop this patch when no supported install is older than 0.5.11.
"""

from sgl_accel._registry import Patch, Part, Target
from sgl_accel._rewrite import Present, Probe, Rule

MODULE = "sglang.srt.layers.attention.nsa.nsa_indexer"
# 0.5.13 renamed NSA to DSA; nsa_indexer.py became a re-export shim.
DSA_MODULE = "sglang.srt.layers.attention.dsa.dsa_indexer"
HEAD_GATES = ("Indexer._project_and_scale_head_gates", "Indexer._get_logits_head_gate")
WRITE_BACKS = {"Indexer._get_q_k_bf16": 2, "Indexer._get_k_bf16": 1}


def _helpers():
    import torch

    is_compiling = torch.compiler.is_compiling

    def _byte_extent(t):
        # [first, end) bytes of its storage that a (non-empty) view can touch.
        lo = hi = t.storage_offset()
        for size, stride in zip(t.shape, t.stride()):
            if stride < 0:
                lo += (size - 1) * stride
            else:
                hi += (size - 1) * stride
        return lo * t.element_size(), (hi + 1) * t.element_size()

    def _sgl_accel_write_back(dst, src):
        """``dst[...] = src`` as the original's ``dst[...] = src.clone()`` meant it,
        without the clone: nothing when the RoPE kernel rotated ``dst`` in place and
        handed back that very view, else one ``copy_``."""
        # ``x[...] = v`` drops leading size-1 dims of v (NumPy's rule), copy_ does
        # not; DeepSeek-YaRN's forward_native returns such dims for one token.
        while src.dim() > dst.dim() and src.shape[0] == 1:
            src = src[0]
        if is_compiling():
            # Storage identity is not observable while tracing. The functionalized
            # graph copies from a snapshot of src, and a view copied onto itself is
            # a no-op, so the plain copy is right in every case.
            dst.copy_(src)
            return
        if (
            src.numel() == 0
            or src.device != dst.device
            or src.untyped_storage().data_ptr() != dst.untyped_storage().data_ptr()
        ):
            dst.copy_(src)  # separate memory: the one copy
            return
        if (
            src.dtype == dst.dtype
            and src.storage_offset() == dst.storage_offset()
            and src.shape == dst.shape
            and src.stride() == dst.stride()
        ):
            return  # the very same view: already written in place
        # Same storage, another view (e.g. same start, other strides). Where the
        # two can overlap, copy_ would read elements it already overwrote: keep
        # the snapshot the original took (judged by byte ranges, so interleaved
        # but disjoint views take it too). No RoPE path of the releases gets here.
        s_lo, s_hi = _byte_extent(src)
        d_lo, d_hi = _byte_extent(dst)
        if s_lo < d_hi and d_lo < s_hi:
            src = src.clone()
        dst.copy_(src)

    return {"_sgl_accel_write_back": _sgl_accel_write_back}


def _compile_rule():
    # The decorator expression of 0.5.9-0.5.10.post1; only its HIP arm changes.
    return Rule(
        "compile on ROCm too",
        find="torch.compile(dynamic=True) if not _is_hip else lambda f: f",
        replace="torch.compile(dynamic=True)",
    )


# Marker for an already-compiled head gate. Upstream #22232 only dropped the
# conditional, and the new decorator is a sub-expression of the old one, so no
# pattern can match "unconditional decorator" alone (Target.upstream takes only
# patterns). The releases that dropped it (0.5.11, 0.5.12.post1) are also the
# first whose head gates accept the aiter tuple input; that signature is the marker.
_COMPILED_HEAD_GATE = "Union[torch.Tensor, Tuple[torch.Tensor, ...]]"


def _always_compiled(def_node) -> int:
    """1 when the function's only decorator is a plain ``torch.compile(dynamic=True)``."""
    import ast

    decorators = [ast.unparse(d) for d in def_node.decorator_list]
    return int(decorators == ["torch.compile(dynamic=True)"])


# The indexer before 0.5.10, a form the patch was not written for (0.5.3.post3-0.5.9):
# until 0.5.7 the head gate is compiled on every platform (the HIP exception came in 0.5.8),
# and until 0.5.9 the RoPE result is written back with one plain copy (the extra .clone()
# came in 0.5.10); 0.5.3.post3-0.5.7 have no _project_and_scale_head_gates, and
# 0.5.3.post3/0.5.4 no _get_k_bf16.
_OLDER_HEAD_GATE = (
    Probe("decorated with plain torch.compile(dynamic=True)", _always_compiled),
    "older form: compiled with torch.compile on every platform (before the HIP exception this patch removes)",
)
_OLDER_WRITE_BACK = (
    "__dst[..., : self.rope_head_dim] = __src",
    "older form: the RoPE result is written back with one plain copy (before the .clone() this patch removes)",
)


def _write_back_rules(count: int):
    return [
        Present(
            "the RoPE call whose result is written back",
            "__q_out, __k_out = self.rotary_emb(positions, __q_in, __k_in)",
        ),
        Rule(
            "write RoPE results back without a clone",
            find="__dst[..., : self.rope_head_dim] = __src.clone()",
            replace="_sgl_accel_write_back(__dst[..., : self.rope_head_dim], __src)",
            count=count,
        ),
    ]


PATCH = Patch(
    name="nsa-indexer-fusion",
    upstream_pr="#22232",
    kind="perf",
    summary=(
        "NSA indexer: torch.compile the head-gate functions on ROCm as on CUDA; write RoPE "
        "results back with at most one copy, none when RoPE ran in place"
    ),
    hardware=("cuda", "rocm"),
    releases=">=0.5.10",
    parts=[
        Part(
            "compile-head-gates",
            [
                Target(
                    MODULE,
                    name,
                    rules=[_compile_rule()],
                    upstream=[_COMPILED_HEAD_GATE],
                    moved=[(DSA_MODULE, name)],
                    older=[_OLDER_HEAD_GATE],
                )
                for name in HEAD_GATES
            ],
            hardware=("rocm",),
        ),
        Part(
            "rope-writeback",
            [
                Target(
                    MODULE,
                    name,
                    rules=_write_back_rules(count),
                    upstream=["self._update_rope_guarded(__dst, __src)"],
                    moved=[(DSA_MODULE, name)],
                    older=[_OLDER_WRITE_BACK],
                )
                for name, count in WRITE_BACKS.items()
            ],
            hardware=("cuda", "rocm"),
        ),
    ],
    helpers=_helpers,
)
