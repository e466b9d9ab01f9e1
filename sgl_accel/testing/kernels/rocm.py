"""ROCm-side functions on the NSA (DeepSeek sparse attention) decode path, and
capture points for the kernels ``NativeSparseAttnBackend.forward_decode`` calls.

What the released backends call (read in nsa_backend.py of 0.5.10.post1 – 0.5.12.post1
and dsa_backend.py of 0.5.13.post1, where the class is ``DeepseekSparseAttnBackend``):

* ``nsa_decode_impl == "tilelang"``: ``q_all = concat_mla_absorb_q_general(q_nope, q_rope)``
  (a module global of the backend module, imported from ``layers/attention/utils.py``;
  on non-CUDA it is ``torch.cat([q_nope, q_rope], -1)``), then ``_forward_tilelang``
  does a *function-local* ``from sglang.srt.layers.attention.{nsa,dsa}.tilelang_kernel
  import tilelang_sparse_fwd`` and calls
  ``tilelang_sparse_fwd(q=q_all, kv=kv_cache, indices=page_table_1.unsqueeze(1),
  sm_scale=..., d_v=v_head_dim)`` -> ``(T, H, d_v)``. tilelang_kernel imports the
  ``tilelang`` package, which is not installable here, so the recorder puts a small
  module in ``sys.modules`` under that name while installed.
* ``nsa_decode_impl == "aiter"``: ``q_all = torch.cat([q_nope, q_rope], -1)``, then
  ``_forward_aiter`` calls the backend-module globals
  ``get_valid_kv_indices(page_table_1, kv_indptr, kv_indices, bs)`` (sglang's Triton
  compaction kernel) and ``mla_decode_fwd(q (T, H, 576), kv_cache.view(-1, 1, 1, 576),
  o (T, H, d_v), qo_indptr, kv_indptr, kv_indices, kv_last_page_lens, max_seqlen_q,
  sm_scale=, logit_cap=)``, which writes ``o`` in place. Both names are imported only
  under ``if _is_hip:`` at module import, so on this machine they do not exist in the
  backend module until the recorder installs them.

The recorder keeps the very tensor objects the entry points receive, so a test can
compare storages (``untyped_storage().data_ptr()``) and bytes, and returns results
computed by :func:`sparse_mla_reference`, a plain-torch sparse MLA attention.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "DecodeCall",
    "DecodeRecorder",
    "mla_decode_reference",
    "sparse_mla_reference",
    "valid_kv_indices_reference",
]

# tilelang_kernel module names per release layout (nsa/ up to 0.5.12, dsa/ from 0.5.13).
_TILELANG_MODULES = (
    "sglang.srt.layers.attention.nsa.tilelang_kernel",
    "sglang.srt.layers.attention.dsa.tilelang_kernel",
)


def _kv_rows(kv: torch.Tensor) -> torch.Tensor:
    """KV cache as (tokens, dim): the MLA pool is (tokens, 1, 576); aiter gets
    (tokens, 1, 1, 576)."""
    return kv.reshape(kv.shape[0], kv.shape[-1])


def sparse_mla_reference(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    logit_cap: float = 0.0,
) -> torch.Tensor:
    """Absorbed-MLA attention of each query token over its selected KV tokens.

    q: (T, H, D) with D = kv_lora_rank + rope dim (576); kv: (N, [1, [1,]] D), the
    latent cache whose first ``d_v`` dims are also the value; indices: (T, K) or
    (T, 1, K) token rows of ``kv``, ``-1`` = unused slot. Returns (T, H, d_v) in
    q's dtype: ``softmax(q·kᵀ·sm_scale) · k[:, :d_v]`` over the valid indices,
    accumulated in fp32. A token with no valid index gets zeros [inferred: what the
    kernels produce for an empty selection is not documented].
    ``logit_cap > 0`` applies ``cap·tanh(s/cap)`` to the scaled scores [inferred from
    sglang's logit_cap convention in its Triton attention kernels].
    """
    if q.dim() != 3:
        raise ValueError(f"q must be (T, H, D), got {tuple(q.shape)}")
    rows = _kv_rows(kv).float()
    idx = indices.reshape(indices.shape[0], -1).long()
    if idx.shape[0] != q.shape[0]:
        raise ValueError(f"indices rows {idx.shape[0]} != query tokens {q.shape[0]}")
    if rows.shape[-1] != q.shape[-1]:
        raise ValueError(f"kv dim {rows.shape[-1]} != q dim {q.shape[-1]}")
    valid = idx >= 0
    sel = rows[idx.clamp(min=0)]  # (T, K, D)
    scores = torch.einsum("thd,tkd->thk", q.float(), sel) * sm_scale
    if logit_cap and logit_cap > 0:
        scores = logit_cap * torch.tanh(scores / logit_cap)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with no valid index
    out = torch.einsum("thk,tkd->thd", probs, sel[..., :d_v])
    return out.to(q.dtype)


def valid_kv_indices_reference(page_table_1, kv_indptr, kv_indices, bs: int) -> None:
    """Torch model of sglang's ``get_valid_kv_indices`` (nsa/triton_kernel.py): for each
    of the first ``bs`` rows, the entries != -1, in order, written to
    ``kv_indices[kv_indptr[b]:]``. ``kv_indptr`` is filled by the caller."""
    for b in range(bs):
        row = page_table_1[b]
        kept = row[row != -1]
        start = int(kv_indptr[b])
        kv_indices[start : start + kept.numel()] = kept.to(kv_indices.dtype)


def mla_decode_reference(
    q,
    kv_buffer,
    o,
    qo_indptr,
    kv_indptr,
    kv_indices,
    kv_last_page_lens=None,
    max_seqlen_q=None,
    sm_scale=None,
    logit_cap=0.0,
    **_ignored,
):
    """Model of aiter's ``mla_decode_fwd`` with page size 1 (how the NSA backend calls
    it): request b's queries ``q[qo_indptr[b]:qo_indptr[b+1]]`` attend to kv rows
    ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]``; the result is written into ``o``.
    ``kv_last_page_lens`` is irrelevant with one token per page [inferred]. The NSA
    decode path passes ``qo_indptr = cu_seqlens_q`` and the per-token top-k
    selection as one request per query token (bs = number of tokens) [inferred from
    the call site; aiter's own docs were not read]. Returns None."""
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5  # [inferred default]
    d_v = o.shape[-1]
    n_req = qo_indptr.numel() - 1
    for b in range(n_req):
        q0, q1 = int(qo_indptr[b]), int(qo_indptr[b + 1])
        k0, k1 = int(kv_indptr[b]), int(kv_indptr[b + 1])
        if q1 <= q0:
            continue
        sel = kv_indices[k0:k1].long()
        idx = sel.unsqueeze(0).expand(q1 - q0, -1)
        o[q0:q1] = sparse_mla_reference(q[q0:q1], kv_buffer, idx, sm_scale, d_v, logit_cap).to(o.dtype)
    return None


@dataclass
class DecodeCall:
    """One call that reached a capture point."""

    entry: str  # "tilelang_sparse_fwd" | "mla_decode_fwd" | "concat_mla_absorb_q_general"
    q: torch.Tensor  # the q object itself (for concat: the output it produced)
    args: dict = field(default_factory=dict)
    result: Any = None


class DecodeRecorder:
    """Capture point for the ROCm NSA decode kernels.

    >>> rec = DecodeRecorder()
    >>> with rec.installed(backend_module):       # e.g. sglang...nsa_backend
    ...     out = backend.forward_decode(...)
    >>> rec.decode_calls[0].q                      # tensor handed to the kernel
    >>> rec.concat_calls                           # concat_mla_absorb_q_general calls

    ``installed`` patches, in the module that defines the backend class
    (pass the class or the module; the 0.5.13 nsa_backend shim re-exports from
    dsa_backend, so patching the shim would miss): ``concat_mla_absorb_q_general``
    (recorded, then the original runs), ``mla_decode_fwd`` and
    ``get_valid_kv_indices`` (reference models), and provides a
    ``tilelang_kernel`` module whose ``tilelang_sparse_fwd`` is the reference.
    Everything is restored on exit.
    """

    def __init__(self):
        self.calls: list[DecodeCall] = []
        self._undo: list = []

    # -- recorded views ---------------------------------------------------
    @property
    def decode_calls(self) -> list[DecodeCall]:
        return [c for c in self.calls if c.entry in ("tilelang_sparse_fwd", "mla_decode_fwd")]

    @property
    def concat_calls(self) -> list[DecodeCall]:
        return [c for c in self.calls if c.entry == "concat_mla_absorb_q_general"]

    def clear(self):
        self.calls.clear()

    # -- the stand-in entry points -----------------------------------------
    def tilelang_sparse_fwd(self, q, kv, indices, sm_scale, d_v=512):
        out = sparse_mla_reference(q, kv, indices, sm_scale, d_v)
        self.calls.append(
            DecodeCall("tilelang_sparse_fwd", q, dict(kv=kv, indices=indices, sm_scale=sm_scale, d_v=d_v), out)
        )
        return out

    def mla_decode_fwd(self, q, kv_buffer, o, qo_indptr, kv_indptr, kv_indices, kv_last_page_lens=None,
                       max_seqlen_q=None, sm_scale=None, logit_cap=0.0, **kwargs):
        mla_decode_reference(q, kv_buffer, o, qo_indptr, kv_indptr, kv_indices, kv_last_page_lens,
                             max_seqlen_q, sm_scale=sm_scale, logit_cap=logit_cap)
        self.calls.append(
            DecodeCall(
                "mla_decode_fwd", q,
                dict(kv_buffer=kv_buffer, o=o, qo_indptr=qo_indptr, kv_indptr=kv_indptr,
                     kv_indices=kv_indices, sm_scale=sm_scale, logit_cap=logit_cap, **kwargs),
                o,
            )
        )
        return None

    def _wrap_concat(self, original):
        def concat_mla_absorb_q_general(q_nope, q_rope):
            out = original(q_nope, q_rope)
            self.calls.append(DecodeCall("concat_mla_absorb_q_general", out, dict(q_nope=q_nope, q_rope=q_rope), out))
            return out

        return concat_mla_absorb_q_general

    # -- installation -------------------------------------------------------
    def _set(self, obj, name, value):
        missing = object()
        old = getattr(obj, name, missing) if not isinstance(obj, dict) else obj.get(name, missing)
        if isinstance(obj, dict):
            obj[name] = value
        else:
            setattr(obj, name, value)
        self._undo.append((obj, name, old, missing))

    def install(self, backend) -> "DecodeRecorder":
        module = backend if isinstance(backend, types.ModuleType) else sys.modules[backend.__module__]
        if "concat_mla_absorb_q_general" in vars(module):
            self._set(module, "concat_mla_absorb_q_general", self._wrap_concat(module.concat_mla_absorb_q_general))
        self._set(module, "mla_decode_fwd", self.mla_decode_fwd)
        self._set(module, "get_valid_kv_indices", valid_kv_indices_reference)
        for name in _TILELANG_MODULES:
            parent = name.rsplit(".", 1)[0]
            if parent not in sys.modules:
                continue
            mod = types.ModuleType(name, "sgl_accel DecodeRecorder stand-in for sglang's tilelang kernels")
            mod.tilelang_sparse_fwd = self.tilelang_sparse_fwd
            self._set(sys.modules, name, mod)
            self._set(sys.modules[parent], "tilelang_kernel", mod)
        return self

    def uninstall(self):
        while self._undo:
            obj, name, old, missing = self._undo.pop()
            if isinstance(obj, dict):
                if old is missing:
                    obj.pop(name, None)
                else:
                    obj[name] = old
            elif old is missing:
                if hasattr(obj, name):
                    delattr(obj, name)
            else:
                setattr(obj, name, old)

    def installed(self, backend):
        recorder = self

        class _Ctx:
            def __enter__(self_inner):
                return recorder.install(backend)

            def __exit__(self_inner, *exc):
                recorder.uninstall()
                return False

        return _Ctx()
