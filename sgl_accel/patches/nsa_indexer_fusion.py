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
  ``dst`` viewed the same way, otherwise one ``copy_``; never a clone.

Better than upstream: upstream skips the copy when ``src.data_ptr() ==
dst.data_ptr()``, which also skips a view that starts at the same address but
has other sizes or strides (its elements are not the destination's). Here the
skip needs the same storage, storage offset, sizes, strides and dtype. While
torch.compile traces, storage identity is not observable, so the helper always
copies there (a copy of a view onto itself is a no-op); upstream added the same
``is_compiling()`` guard only in 0.5.13.

Releases: the four targets have the pre-change shape in 0.5.10 and 0.5.10.post1
(applies). 0.5.11 and 0.5.12.post1 contain #22232 (``upstream``, per part).
0.5.13 moved the indexer to ``layers/attention/dsa/dsa_indexer.py`` (already
changed) and left ``nsa/nsa_indexer.py`` as a re-export shim that DeepSeek/GLM
no longer import, so the range stops before 0.5.13. 0.5.9 and older have no
``.clone()`` in the write-back and are outside the range too.

Not taken from 0.5.11: its other indexer changes (bf16 ``weights_proj`` on ROCm,
the aiter tuple input), which belong to other upstream changes.

Drop this patch when no supported install is older than 0.5.11.
"""

from sgl_accel._registry import Patch, Part, Target
from sgl_accel._rewrite import Present, Rule

MODULE = "sglang.srt.layers.attention.nsa.nsa_indexer"
HEAD_GATES = ("Indexer._project_and_scale_head_gates", "Indexer._get_logits_head_gate")
WRITE_BACKS = {"Indexer._get_q_k_bf16": 2, "Indexer._get_k_bf16": 1}


def _helpers():
    import torch

    is_compiling = torch.compiler.is_compiling

    def _sgl_accel_write_back(dst, src):
        """Write ``src`` into ``dst``: nothing if ``src`` is ``dst`` itself (in-place
        RoPE), else one ``copy_``. Only an identical view may skip: a view that
        merely starts at the same address holds other elements."""
        if not is_compiling() and (
            src.dtype == dst.dtype
            and src.device == dst.device
            and src.storage_offset() == dst.storage_offset()
            and src.shape == dst.shape
            and src.stride() == dst.stride()
            and src.untyped_storage().data_ptr() == dst.untyped_storage().data_ptr()
        ):
            return
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
    releases=">=0.5.10,<0.5.13",
    parts=[
        Part(
            "compile-head-gates",
            [Target(MODULE, name, rules=[_compile_rule()], upstream=[_COMPILED_HEAD_GATE]) for name in HEAD_GATES],
            hardware=("rocm",),
        ),
        Part(
            "rope-writeback",
            [
                Target(MODULE, name, rules=_write_back_rules(count), upstream=["self._update_rope_guarded(__dst, __src)"])
                for name, count in WRITE_BACKS.items()
            ],
            hardware=("cuda", "rocm"),
        ),
    ],
    helpers=_helpers,
)
