"""Pure-PyTorch model of ``torch_npu.npu_fused_infer_attention_score`` (FIA v1).

The semantics follow docs/../shared/reference/npu-ops.md section 1 (torch_npu / CANN
documentation plus SGLang call sites). Tags used in the comments below:

* ``[DOC]``        stated in the torch_npu documentation of the op;
* ``[CALL]``       what SGLang's call sites rely on;
* ``[INF]``        inferred, not documented anywhere: a hypothesis;
* ``NOT FOUND``    not stated in any source read: the model either rejects the case
                   (``NotImplementedError``) or picks the value named in the comment.

Scope: layouts TND, BSND, BSH, BNSD; contiguous or paged KV (pool formats
``(blocknum, blocksize, N_kv*D)``, ``(blocknum, N_kv, blocksize, D)`` and the NZ form
``(blocknum, N_kv, D/16, blocksize, 16)``); GQA; MLA (``query_rope``/``key_rope``);
``sparse_mode`` 0-4; ``softmax_lse_flag``. Quantisation, pse, shared prefix and left
padding are not modelled and raise ``NotImplementedError`` when used.

Documented limits the model does not enforce (they depend on the chip and the case, and
SGLang's own configurations differ): head-dim restrictions of TND (D = 128/192 without
rope), block_size multiples (128 for Q_S > 1, 16 for TND/MLA), the axis maxima.

Arithmetic is fp32 whatever the input dtype; the output is cast to the query dtype
(the op's internal precision is NOT FOUND). fp32 inputs are accepted for precise
testing although the real op takes fp16/bf16 only [DOC].

Every call records how its length arguments arrived (``last_call_arg_types``,
``call_log``): the real op declares them ``SymInt[]`` (Python int lists); the model
accepts tensors and numpy arrays too, so that tests can see what a caller passed.
Set ``strict_length_types = True`` to make anything but a list/tuple of Python ints
raise ``TypeError`` instead.
"""

from __future__ import annotations

import collections
import operator
import weakref
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "npu_fused_infer_attention_score",
    "npu_fused_infer_attention_score_out",
    "get_max_workspace",
    "last_call_arg_types",
    "call_log",
    "reset_call_log",
    "describe_type",
    "is_python_int_list",
    "strict_length_types",
    "TEMPLATE_MASK_SIZE",
]

INT_MAX = 2147483647
# sparse_mode 2/3/4 take an "optimised" 2048x2048 lower-triangular template [DOC].
TEMPLATE_MASK_SIZE = 2048

# Argument-type record of the most recent call (any entry point of this module),
# e.g. {"actual_seq_lengths": "numpy.ndarray[int64]", "actual_seq_lengths_kv": "list[int]"}.
last_call_arg_types: dict[str, str] = {}
# One dict per call, oldest first (bounded): op, input_layout, sparse_mode, paged,
# query_shape, arg_types, and python_int_list flags for the two length arguments.
call_log: collections.deque = collections.deque(maxlen=1024)
# When True, lengths that are not a list/tuple of Python ints raise TypeError.
strict_length_types = False

_LENGTH_ARGS = ("actual_seq_lengths", "actual_seq_lengths_kv")

# Documented arguments this model does not implement: accepted only at their defaults.
_UNMODELLED_TENSOR_ARGS = (
    "pse_shift",
    "dequant_scale1",
    "quant_scale1",
    "dequant_scale2",
    "quant_scale2",
    "quant_offset2",
    "antiquant_scale",
    "antiquant_offset",
    "query_padding_size",
    "kv_padding_size",
    "key_antiquant_scale",
    "key_antiquant_offset",
    "value_antiquant_scale",
    "value_antiquant_offset",
    "key_shared_prefix",
    "value_shared_prefix",
    "actual_shared_prefix_len",
    "key_rope_antiquant_scale",
)
_UNMODELLED_INT_ARGS = ("antiquant_mode", "key_antiquant_mode", "value_antiquant_mode")

_LAYOUTS = ("BSH", "BSND", "BNSD", "TND")
# Documented layouts with a transposed output; not used by SGLang 0.5.11-0.5.13.
_OTHER_DOC_LAYOUTS = ("BNSD_BSND", "BSH_NBSD", "BSND_NBSD", "BNSD_NBSD", "TND_NTD", "NTD_TND", "NTD")
_MASK_DTYPES = (torch.bool, torch.int8, torch.uint8)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------
# argument-type recording


def _type_name(x: Any) -> str:
    t = type(x)
    if t.__module__ == "builtins":
        return t.__name__
    return f"{t.__module__}.{t.__qualname__}"


def describe_type(x: Any) -> str:
    """A short, stable description of a length-like argument's Python type.

    ``None`` -> "None"; ``[1, 2]`` -> "list[int]"; ``[np.int64(1)]`` -> "list[numpy.int64]";
    ``np.array([1])`` -> "numpy.ndarray[int64]"; ``torch.tensor([1])`` -> "torch.Tensor[int64]".
    """
    if x is None:
        return "None"
    if isinstance(x, torch.Tensor):
        return f"torch.Tensor[{str(x.dtype).replace('torch.', '')}]"
    if isinstance(x, (list, tuple)):
        names = sorted({_type_name(e) for e in x})
        return f"{_type_name(x)}[{','.join(names)}]"
    dtype = getattr(x, "dtype", None)
    if dtype is not None:
        return f"{_type_name(x)}[{dtype}]"
    return _type_name(x)


def is_python_int_list(x: Any) -> bool:
    """True iff ``x`` is a plain list of plain Python ints (what the real op's binding wants)."""
    return type(x) is list and all(type(e) is int for e in x)


def reset_call_log() -> None:
    call_log.clear()
    last_call_arg_types.clear()


def _record(op: str, query, input_layout, sparse_mode, block_table, atten_mask, lengths: dict) -> None:
    types = {name: describe_type(value) for name, value in lengths.items()}
    types["block_table"] = describe_type(block_table)
    types["atten_mask"] = describe_type(atten_mask)
    last_call_arg_types.clear()
    last_call_arg_types.update(types)
    call_log.append(
        {
            "op": op,
            "input_layout": input_layout,
            "sparse_mode": sparse_mode,
            "paged": block_table is not None,
            "query_shape": tuple(query.shape) if isinstance(query, torch.Tensor) else None,
            "arg_types": dict(types),
            "python_int_list": {name: is_python_int_list(value) for name, value in lengths.items()},
            # Raw values, as Python ints, for tests that check what a caller passed.
            "values": {name: _peek_ints(value) for name, value in lengths.items()},
        }
    )


def _peek_ints(x: Any):
    try:
        return None if x is None else _as_int_list(x, "length")
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------------------
# length parsing


def _as_int_list(x: Any, name: str) -> list[int]:
    """Lengths as a list of Python ints; accepts lists/tuples, 1-D tensors and numpy arrays."""
    if isinstance(x, torch.Tensor):
        if x.dim() > 1 or x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise TypeError(f"{name}: expected a 1-D integer tensor, got {x.dtype} of shape {tuple(x.shape)}")
        items = x.reshape(-1).tolist()
    elif isinstance(x, (list, tuple)):
        items = list(x)
    elif hasattr(x, "tolist") and hasattr(x, "ndim"):  # numpy array
        if x.ndim > 1:
            raise TypeError(f"{name}: expected a 1-D sequence, got ndim={x.ndim}")
        items = x.tolist()
        items = items if isinstance(items, list) else [items]
    else:
        raise TypeError(f"{name}: expected a list of ints, got {describe_type(x)}")
    out = []
    for v in items:
        if isinstance(v, bool):
            raise TypeError(f"{name}: booleans are not lengths ({items!r})")
        if isinstance(v, torch.Tensor):
            if v.numel() != 1 or v.dtype.is_floating_point or v.dtype == torch.bool:
                raise TypeError(f"{name}: element {v!r} is not an integer scalar")
            v = v.item()
        try:
            out.append(operator.index(v))
        except TypeError:
            raise TypeError(f"{name}: element {v!r} ({_type_name(v)}) is not an integer") from None
    return out


def _check_strict(x: Any, name: str) -> None:
    if strict_length_types and x is not None:
        if not (isinstance(x, (list, tuple)) and all(type(e) is int for e in x)):
            raise TypeError(f"{name} must be a list of Python ints (strict mode), got {describe_type(x)}")


def _cumulative_to_spans(cum: list[int], total: int, name: str) -> list[tuple[int, int]]:
    """Cumulative end offsets -> [(start, end)] per batch; validated [DOC: non-negative,
    non-decreasing]."""
    spans, prev = [], 0
    for b, end in enumerate(cum):
        if end < 0:
            raise ValueError(f"{name}[{b}] = {end} is negative")
        if end < prev:
            raise ValueError(
                f"{name} must be cumulative (non-decreasing) end offsets for TND, got {cum!r}: "
                f"element {b} ({end}) < element {b - 1} ({prev})"
            )
        spans.append((prev, end))
        prev = end
    # What the op does with tokens after the last offset is NOT FOUND; SGLang slices its
    # padding tokens off before calling, so the model insists the offsets cover the tensor.
    if prev != total:
        raise ValueError(f"{name}: last cumulative offset {prev} != number of tokens {total} in the tensor")
    return spans


def _per_batch(values: list[int] | None, batch: int, limit: int, name: str) -> list[int]:
    """Per-batch lengths with the documented broadcast rules [DOC]: None -> the tensor's S;
    one element -> shared by every batch; >= batch elements -> the first `batch`."""
    if values is None:
        return [limit] * batch
    if len(values) == 1:
        values = values * batch
    elif len(values) >= batch:
        values = values[:batch]
    else:
        raise ValueError(f"{name} has {len(values)} elements for batch {batch}: must be 1 or >= batch")
    for b, v in enumerate(values):
        if v < 0 or v > limit:
            raise ValueError(f"{name}[{b}] = {v} outside [0, {limit}]")
    return values


# ----------------------------------------------------------------------------------------
# the plan: everything validated, per-batch views described


@dataclass
class _Plan:
    layout: str
    batch: int
    nq: int
    nkv: int
    d: int
    dv: int
    dr: int  # rope head dim (0 without MLA)
    q: torch.Tensor  # (B, S, Nq, D) or (T, Nq, D)
    q_rope: torch.Tensor | None
    q_spans: list[tuple[int, int]]  # TND: token ranges; else [(0, Sq_b)]
    kv_lens: list[int]
    # non-paged: K (B, Skv, Nkv, D) or (Tkv, Nkv, D) and spans; paged: pools (nb, bs, Nkv, *)
    k: torch.Tensor
    v: torch.Tensor
    k_rope: torch.Tensor | None
    kv_spans: list[tuple[int, int]] | None
    block_table: torch.Tensor | None
    block_size: int
    mask_kind: str  # "none", "elementwise", "causal_tl", "causal_br", "band_br"
    mask4: torch.Tensor | None  # elementwise mask as (Bm, 1, Sm, Km), nonzero = masked
    band: bool  # mode 0 with a mask: also apply the pre/next window (top-left origin)
    pre_tokens: int
    next_tokens: int
    scale: float
    sparse_mode: int
    inner_precise: int
    softmax_lse_flag: bool
    out_dtype: torch.dtype


def _as_int(x, name) -> int:
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {describe_type(x)}") from None


def _split_heads(x: torch.Tensor, layout: str, heads: int | None, what: str) -> torch.Tensor:
    """Bring a query-like tensor to (B, S, N, D) (or (T, N, D) for TND)."""
    if layout == "BSH":
        if x.dim() != 3:
            raise ValueError(f"{what}: BSH expects (B, S, H), got shape {tuple(x.shape)}")
        if x.shape[2] % heads:
            raise ValueError(f"{what}: H={x.shape[2]} is not divisible by {heads} heads")
        return x.reshape(x.shape[0], x.shape[1], heads, x.shape[2] // heads)
    if layout == "BSND":
        if x.dim() != 4:
            raise ValueError(f"{what}: BSND expects (B, S, N, D), got shape {tuple(x.shape)}")
        return x
    if layout == "BNSD":
        if x.dim() != 4:
            raise ValueError(f"{what}: BNSD expects (B, N, S, D), got shape {tuple(x.shape)}")
        return x.transpose(1, 2)
    if x.dim() != 3:
        raise ValueError(f"{what}: TND expects (T, N, D), got shape {tuple(x.shape)}")
    return x


def _pool_to_bsnd(x: torch.Tensor, nkv: int, block_size: int, layout: str, what: str) -> torch.Tensor:
    """A paged KV pool as (blocknum, blocksize, N_kv, D), whatever its documented format."""
    if x.dim() == 3:  # (blocknum, blocksize, N_kv*D) [DOC]
        if x.shape[1] != block_size:
            raise ValueError(f"{what}: pool block dim {x.shape[1]} != block_size {block_size}")
        if x.shape[2] % nkv:
            raise ValueError(f"{what}: pool H={x.shape[2]} is not divisible by {nkv} kv heads")
        return x.reshape(x.shape[0], block_size, nkv, x.shape[2] // nkv)
    if layout in ("BSH", "BSND"):
        # [DOC] "kv cache排布: BSH/BSND仅BnBsH" - only (blocknum, blocksize, H) for these.
        raise ValueError(
            f"{what}: with input_layout={layout} the paged KV pool must be (blocknum, blocksize, H), "
            f"got shape {tuple(x.shape)}"
        )
    if x.dim() == 4:  # (blocknum, N_kv, blocksize, D) [DOC]
        if x.shape[1] != nkv or x.shape[2] != block_size:
            raise ValueError(
                f"{what}: pool {tuple(x.shape)} is not (blocknum, {nkv} kv heads, block_size {block_size}, D)"
            )
        return x.transpose(1, 2)
    if x.dim() == 5:  # NZ (blocknum, N_kv, D/16, blocksize, 16): shape [DOC], element order [INF]
        if x.shape[1] != nkv or x.shape[3] != block_size:
            raise ValueError(
                f"{what}: NZ pool {tuple(x.shape)} is not (blocknum, {nkv}, D/c, block_size {block_size}, c)"
            )
        nb, _, d1, bs, d0 = x.shape
        return x.permute(0, 3, 1, 2, 4).reshape(nb, bs, nkv, d1 * d0)
    raise ValueError(f"{what}: unsupported paged KV pool shape {tuple(x.shape)}")


def _kv_to_bsnd(x: torch.Tensor, layout: str, nkv: int, what: str) -> torch.Tensor:
    """Contiguous key/value as (B, Skv, N_kv, D) (or (Tkv, N_kv, D) for TND)."""
    y = _split_heads(x, layout, nkv, what)
    if y.shape[-2] != nkv:
        # [DOC] num_key_value_heads must match key/value's N axis for BSND/BNSD.
        raise ValueError(f"{what}: has {y.shape[-2]} heads, expected num_key_value_heads={nkv}")
    return y


_template_cache: dict[torch.device, torch.Tensor] = {}
# Masks already found to be the template: (weakref to the owning tensor, data_ptr, strides,
# version). SGLang passes one persistent mask (or a fresh view of it) on every call.
_validated_templates: collections.deque = collections.deque(maxlen=8)


def _template_key(mask: torch.Tensor):
    owner = mask._base if mask._base is not None else mask
    return owner, (mask.data_ptr(), mask.stride(), mask.dtype, mask._version)


def _check_template(mask: torch.Tensor, sparse_mode: int) -> None:
    """sparse_mode 2/3/4: the mask must be the 2048x2048 lower-triangular template [DOC];
    the op only says the user must guarantee it, the model checks it."""
    n = TEMPLATE_MASK_SIZE
    if tuple(mask.shape) not in ((n, n), (1, n, n), (1, 1, n, n)):
        raise ValueError(
            f"sparse_mode={sparse_mode} needs the ({n}, {n}) / (1, {n}, {n}) / (1, 1, {n}, {n}) template "
            f"atten_mask, got shape {tuple(mask.shape)}"
        )
    owner, key = _template_key(mask)
    for ref, seen in _validated_templates:
        if ref() is owner and seen == key:
            return
    expected = _template_cache.get(mask.device)
    if expected is None:
        expected = torch.ones(n, n, dtype=torch.bool, device=mask.device).triu_(1)
        _template_cache[mask.device] = expected
    if not torch.equal(mask.reshape(n, n) != 0, expected):
        raise ValueError(
            f"sparse_mode={sparse_mode}: atten_mask is not the lower-triangular template "
            "(masked iff column > row, i.e. triu(ones(2048, 2048), 1))"
        )
    _validated_templates.append((weakref.ref(owner), key))


def _prepare(
    query,
    key,
    value,
    *,
    atten_mask,
    actual_seq_lengths,
    actual_seq_lengths_kv,
    block_table,
    query_rope,
    key_rope,
    num_heads,
    scale,
    pre_tokens,
    next_tokens,
    input_layout,
    num_key_value_heads,
    sparse_mode,
    inner_precise,
    block_size,
    softmax_lse_flag,
    other: dict,
) -> _Plan:
    # -- arguments this model does not implement
    for name, val in other.items():
        if name in _UNMODELLED_TENSOR_ARGS:
            if val is not None:
                raise NotImplementedError(f"FIA model: {name} is not modelled")
        elif name in _UNMODELLED_INT_ARGS:
            if val != 0:
                raise NotImplementedError(f"FIA model: {name}={val!r} is not modelled")
        else:
            raise TypeError(f"npu_fused_infer_attention_score() got an unexpected keyword argument {name!r}")

    for t, what in ((query, "query"), (key, "key"), (value, "value")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} must be a Tensor, got {describe_type(t)}")
    if input_layout in _OTHER_DOC_LAYOUTS:
        raise NotImplementedError(f"FIA model: input_layout {input_layout!r} is not modelled")
    if input_layout not in _LAYOUTS:
        raise ValueError(f"unknown input_layout {input_layout!r}")
    layout = input_layout
    if query.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"query dtype {query.dtype} not supported (fp16/bf16; fp32 accepted by the model)")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        # int8/int4 KV exist only with antiquant, which is not modelled.
        raise ValueError(f"key/value dtype ({key.dtype}/{value.dtype}) must equal query dtype {query.dtype}")

    nq = _as_int(num_heads, "num_heads")
    nkv_arg = _as_int(num_key_value_heads, "num_key_value_heads")
    block_size = _as_int(block_size, "block_size")
    pre_tokens = _as_int(pre_tokens, "pre_tokens")
    next_tokens = _as_int(next_tokens, "next_tokens")
    sparse_mode = _as_int(sparse_mode, "sparse_mode")
    inner_precise = _as_int(inner_precise, "inner_precise")
    if nq < 1:
        raise ValueError(f"num_heads must be >= 1, got {nq}")
    if nkv_arg < 0:
        raise ValueError(f"num_key_value_heads must be >= 0, got {nkv_arg}")
    nkv = nkv_arg or nq  # 0 means "same as num_heads" [DOC]
    if nq % nkv:
        raise ValueError(f"GQA: num_heads={nq} is not a multiple of num_key_value_heads={nkv}")
    if nq // nkv > 64:
        raise ValueError(f"GQA: num_heads/num_key_value_heads = {nq // nkv} > 64 is not supported [DOC]")
    if inner_precise not in (0, 1, 2, 3):
        raise ValueError(f"inner_precise must be 0..3, got {inner_precise}")

    # -- query
    q = _split_heads(query, layout, nq, "query")
    if q.shape[-2] != nq:
        raise ValueError(f"query has {q.shape[-2]} heads but num_heads={nq}")
    d = q.shape[-1]

    # -- MLA
    if (query_rope is None) != (key_rope is None):
        raise ValueError("query_rope and key_rope must be given together [DOC]")
    mla = query_rope is not None
    q_rope = None
    dr = 0
    if mla:
        if query_rope.dtype != query.dtype or key_rope.dtype != key.dtype:
            raise ValueError("query_rope/key_rope dtypes must match query/key [DOC]")
        q_rope = _split_heads(query_rope, layout, nq, "query_rope")
        if q_rope.shape[:-1] != q.shape[:-1]:
            raise ValueError(
                f"query_rope {tuple(query_rope.shape)} must match query {tuple(query.shape)} except in D [DOC]"
            )
        dr = q_rope.shape[-1]
        if dr != 64:
            raise ValueError(f"MLA rope head dim must be 64 [DOC], got {dr}")
        if d not in (128, 512):
            raise ValueError(f"MLA: query D must be 512 or 128 [DOC], got {d}")
        if d == 512 and nkv != 1:
            raise ValueError(f"MLA with D=512 needs one kv head [DOC], got {nkv}")
        if d == 512 and softmax_lse_flag:
            raise ValueError("MLA with D=512 does not support softmax_lse [DOC]")

    # -- key / value
    paged = block_table is not None
    if paged:
        if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
            raise ValueError("block_table must be a 2-D tensor (B, maxBlockNumPerSeq) [DOC]")
        if block_table.dtype != torch.int32:
            raise ValueError(f"block_table must be int32 [DOC], got {block_table.dtype}")
        if block_size <= 0:
            raise ValueError(f"paged KV (block_table given) needs block_size > 0, got {block_size}")
        if key.dim() != value.dim() or key.shape[0] != value.shape[0]:
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} pools differ in format")
        k = _pool_to_bsnd(key, nkv, block_size, layout, "key")
        v = _pool_to_bsnd(value, nkv, block_size, layout, "value")
        k_rope = _pool_to_bsnd(key_rope, nkv, block_size, layout, "key_rope") if mla else None
        if mla and k_rope.shape[0] != k.shape[0]:
            raise ValueError("key_rope pool has a different number of blocks than key")
        kv_capacity = block_table.shape[1] * block_size
    else:
        # block_size alone does not enable PageAttention [DOC]: it is unused here.
        k = _kv_to_bsnd(key, layout, nkv, "key")
        v = _kv_to_bsnd(value, layout, nkv, "value")
        if k.shape[:-1] != v.shape[:-1]:
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} differ beyond D")
        k_rope = _kv_to_bsnd(key_rope, layout, nkv, "key_rope") if mla else None
        if mla and k_rope.shape[:-1] != k.shape[:-1]:
            raise ValueError(f"key_rope {tuple(key_rope.shape)} must match key {tuple(key.shape)} except in D")
        kv_capacity = k.shape[0] if layout == "TND" else k.shape[1]
    if k.shape[-1] != d:
        raise ValueError(f"query D={d} but key D={k.shape[-1]}")
    if mla and k_rope.shape[-1] != dr:
        raise ValueError(f"query_rope D={dr} but key_rope D={k_rope.shape[-1]}")
    dv = v.shape[-1]

    # -- lengths
    for name, val in (("actual_seq_lengths", actual_seq_lengths), ("actual_seq_lengths_kv", actual_seq_lengths_kv)):
        _check_strict(val, name)
    q_list = None if actual_seq_lengths is None else _as_int_list(actual_seq_lengths, "actual_seq_lengths")
    kv_list = None if actual_seq_lengths_kv is None else _as_int_list(actual_seq_lengths_kv, "actual_seq_lengths_kv")
    kv_spans = None
    if layout == "TND":
        # [DOC] TND: both lengths must be given; the number of elements of actual_seq_lengths
        # is the batch; its elements are cumulative end offsets.
        if q_list is None:
            raise ValueError("input_layout='TND' requires actual_seq_lengths (cumulative end offsets)")
        if kv_list is None:
            raise ValueError("input_layout='TND' requires actual_seq_lengths_kv")
        batch = len(q_list)
        q_spans = _cumulative_to_spans(q_list, q.shape[0], "actual_seq_lengths")
        if len(kv_list) != batch:
            raise ValueError(
                f"actual_seq_lengths_kv has {len(kv_list)} elements, actual_seq_lengths {batch}: "
                "both must have one per batch in TND"
            )
        if paged:
            # Paged TND: per-sequence kv lengths [DOC for the D=512 MLA case; CALL for the
            # GQA/MHA case SGLang uses, which the doc versions read do not describe].
            kv_lens = list(kv_list)
            for b, n in enumerate(kv_lens):
                if n < 0 or n > kv_capacity:
                    raise ValueError(
                        f"actual_seq_lengths_kv[{b}] = {n} outside [0, {kv_capacity}] "
                        f"(block_table has {block_table.shape[1]} blocks of {block_size})"
                    )
        else:
            # Non-paged TND: cumulative kv offsets as well [DOC].
            kv_spans = _cumulative_to_spans(kv_list, k.shape[0], "actual_seq_lengths_kv")
            kv_lens = [e - s for s, e in kv_spans]
        q_lens = [e - s for s, e in q_spans]
        s_max = max(q_lens, default=0)
    else:
        batch, s = q.shape[0], q.shape[1]
        if not paged and k.shape[0] != batch:
            raise ValueError(f"key batch {k.shape[0]} != query batch {batch}")
        if s == 1:
            # [DOC] Q_S = 1 and not TND: actual_seq_lengths is ignored.
            q_lens = [1] * batch
        else:
            q_lens = _per_batch(q_list, batch, s, "actual_seq_lengths")
        if paged and kv_list is None:
            raise ValueError("PageAttention (block_table given) requires actual_seq_lengths_kv [DOC]")
        kv_lens = _per_batch(kv_list, batch, kv_capacity, "actual_seq_lengths_kv")
        q_spans = [(0, n) for n in q_lens]
        s_max = s
    if paged:
        if block_table.shape[0] < batch:
            raise ValueError(f"block_table has {block_table.shape[0]} rows for batch {batch}")
        # The op does not validate block ids [DOC]; reading outside the pool would give
        # garbage there, so the model rejects it instead.
        nb = k.shape[0]
        for b, n in enumerate(kv_lens):
            used = block_table[b, : -(-n // block_size)]
            if used.numel() and (int(used.min()) < 0 or int(used.max()) >= nb):
                raise ValueError(f"block_table row {b} refers to blocks outside the pool of {nb}: {used.tolist()}")

    # -- mask / sparse_mode
    if atten_mask is not None:
        if not isinstance(atten_mask, torch.Tensor) or atten_mask.dtype not in _MASK_DTYPES:
            raise ValueError(f"atten_mask must be a bool/int8/uint8 tensor [DOC], got {describe_type(atten_mask)}")
    if sparse_mode in (5, 6, 7, 8):
        raise ValueError(f"sparse_mode={sparse_mode} is not supported by FIA [DOC: 暂不支持]")
    if sparse_mode not in (0, 1, 2, 3, 4):
        raise ValueError(f"sparse_mode must be 0..4, got {sparse_mode}")
    if sparse_mode != 0 and atten_mask is None:
        raise ValueError(f"sparse_mode={sparse_mode} requires atten_mask (without a mask only 0 is allowed [DOC])")
    if sparse_mode in (2, 3, 4):
        _check_template(atten_mask, sparse_mode)

    # [DOC] "Q_S = 1 and no rope: sparse_mode has no effect" and "pre/next_tokens: Q_S=1时无效".
    decode = layout != "TND" and s_max == 1 and not mla
    mask_kind, mask4, band = "none", None, False
    if sparse_mode in (0, 1) and atten_mask is not None:
        if layout == "TND":
            # [DOC] TND supports "sparse=0 without mask, or sparse=3 with mask".
            raise ValueError(f"input_layout='TND' does not take an element-wise atten_mask (sparse_mode={sparse_mode})")
        m = atten_mask
        if m.dim() == 2:
            if mla:
                raise ValueError("a 2-D atten_mask is only documented without rope [DOC]")
            if decode:
                # (B, KV_S) per batch for Q_S = 1 [DOC]
                if m.shape[0] != batch:
                    raise ValueError(f"Q_S=1: 2-D atten_mask must be (B={batch}, KV_S), got {tuple(m.shape)}")
                m = m[:, None, None, :]
            else:
                m = m[None, None]  # (Q_S, KV_S) shared by all batches [DOC]
        elif m.dim() == 3:
            m = m[:, None]  # (1 or B, Q_S, KV_S) [DOC]
        elif m.dim() == 4:
            if m.shape[1] != 1:
                raise ValueError(f"4-D atten_mask must be (B or 1, 1, Q_S, KV_S), got {tuple(m.shape)}")
        else:
            raise ValueError(f"atten_mask must be 2-D, 3-D or 4-D, got shape {tuple(m.shape)}")
        if m.shape[0] not in (1, batch):
            raise ValueError(f"atten_mask batch dim {m.shape[0]} is neither 1 nor B={batch}")
        # Q_S/KV_S of the mask may be padded up (alignment) [DOC]; with PageAttention its
        # KV_S must cover maxBlockNumPerSeq * block_size [DOC].
        if m.shape[2] < s_max or m.shape[3] < kv_capacity:
            raise ValueError(
                f"atten_mask {tuple(atten_mask.shape)} is smaller than (Q_S={s_max}, KV_S={kv_capacity})"
            )
        mask_kind, mask4 = "elementwise", m
        # [DOC] mode 0 with a mask also keeps only the pre/next window; mode 1 ignores it;
        # Q_S = 1 ignores pre/next.
        band = sparse_mode == 0 and not decode
    elif sparse_mode in (2, 3, 4):
        if decode:
            # With Q_S = 1 (no rope) the op does not apply sparse_mode [DOC]; whether it then
            # reads the 2048x2048 template element-wise (row 0 = only key 0 visible) or applies
            # no mask is NOT FOUND. Both readings agree only when no batch has more than one key.
            if max(kv_lens, default=0) > 1:
                raise NotImplementedError(
                    f"FIA model: sparse_mode={sparse_mode} with a template mask and Q_S=1 (no rope) "
                    "is ambiguous in the documentation (NOT FOUND); use sparse_mode=0 without a mask"
                )
        else:
            mask_kind = {2: "causal_tl", 3: "causal_br", 4: "band_br"}[sparse_mode]

    return _Plan(
        layout=layout,
        batch=batch,
        nq=nq,
        nkv=nkv,
        d=d,
        dv=dv,
        dr=dr,
        q=q,
        q_rope=q_rope,
        q_spans=q_spans,
        kv_lens=kv_lens,
        k=k,
        v=v,
        k_rope=k_rope,
        kv_spans=kv_spans,
        block_table=block_table if paged else None,
        block_size=block_size,
        mask_kind=mask_kind,
        mask4=mask4,
        band=band,
        pre_tokens=pre_tokens,
        next_tokens=next_tokens,
        scale=float(scale),
        sparse_mode=sparse_mode,
        inner_precise=inner_precise,
        softmax_lse_flag=bool(softmax_lse_flag),
        out_dtype=query.dtype,
    )


# ----------------------------------------------------------------------------------------
# computation


def _kv_of(plan: _Plan, x: torch.Tensor, b: int) -> torch.Tensor:
    """Batch b's keys/values/key_rope as (Skv_b, N_kv, D)."""
    n = plan.kv_lens[b]
    if plan.block_table is not None:
        # Token t of batch b sits in physical block block_table[b, t // block_size] at
        # offset t % block_size [INF: standard paged addressing; the doc only gives formats].
        nblocks = -(-n // plan.block_size)
        ids = plan.block_table[b, :nblocks].to(device=x.device, dtype=torch.long)
        return x.index_select(0, ids).reshape(-1, x.shape[2], x.shape[3])[:n]
    if plan.layout == "TND":
        start, end = plan.kv_spans[b]
        return x[start:end]
    return x[b, :n]


def _q_of(plan: _Plan, x: torch.Tensor, b: int) -> torch.Tensor:
    start, end = plan.q_spans[b]
    return x[start:end] if plan.layout == "TND" else x[b, start:end]


def _allowed(plan: _Plan, b: int, sq: int, skv: int, device) -> torch.Tensor | None:
    """(sq, skv) bool: True where query row i may attend key j (within batch b)."""
    if plan.mask_kind == "none":
        return None
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(skv, device=device)[None, :]
    if plan.mask_kind == "elementwise":
        m = plan.mask4[b if plan.mask4.shape[0] > 1 else 0, 0, :sq, :skv].to(device)
        ok = m == 0  # nonzero / True = masked [DOC]
        if plan.band:
            # Window between pre_tokens and next_tokens, origin top-left [DOC: FA-doc's
            # golden for mode 0; FIA-doc only describes it in words].
            ok = ok & (j - i <= plan.next_tokens) & (i - j <= plan.pre_tokens)
        return ok
    if plan.mask_kind == "causal_tl":  # mode 2: diagonal through the top-left corner [DOC]
        return j <= i
    # Modes 3/4: diagonal through the bottom-right corner [DOC], i.e. query row i sees keys
    # j <= i + (Skv - Sq) with this batch's lengths. (FIA-doc's TND note "actualSeqLengths <
    # actualSeqLengthsKv" for sparse 3 is read as <=: SGLang passes equal lengths [INF].)
    diag = i + (skv - sq)
    if plan.mask_kind == "causal_br":
        return j <= diag
    return (j >= diag - plan.pre_tokens) & (j <= diag + plan.next_tokens)  # mode 4 [DOC]


def _run(plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
    q = plan.q
    device = q.device
    f32 = torch.float32
    group = plan.nq // plan.nkv
    # kv head of query head h: h // (Nq / Nkv) [INF: the mapping is NOT FOUND in the docs;
    # the grouped convention, equal to repeat_interleave on the kv-head axis].
    kv_head = torch.arange(plan.nq, device=device) // group

    if plan.layout == "TND":
        out = torch.zeros(q.shape[0], plan.nq, plan.dv, dtype=f32, device=device)
        lse = torch.full((q.shape[0], plan.nq), float("-inf"), dtype=f32, device=device)
    else:
        out = torch.zeros(q.shape[0], q.shape[1], plan.nq, plan.dv, dtype=f32, device=device)
        lse = torch.full((q.shape[0], q.shape[1], plan.nq), float("-inf"), dtype=f32, device=device)
    # Rows that are never computed (query padding beyond actual_seq_lengths, empty kv) stay
    # at output 0 / lse -inf: output zeros for empty kv is [DOC]; the rest is NOT FOUND.

    for b in range(plan.batch):
        qb = _q_of(plan, q, b).to(f32)  # (sq, Nq, D)
        sq = qb.shape[0]
        skv = plan.kv_lens[b]
        if sq == 0 or skv == 0:
            continue  # empty kv -> all-zero output [DOC]
        kb = _kv_of(plan, plan.k, b).to(f32)[:, kv_head]  # (skv, Nq, D)
        vb = _kv_of(plan, plan.v, b).to(f32)[:, kv_head]  # (skv, Nq, Dv)
        scores = torch.einsum("qhd,khd->hqk", qb, kb)
        if plan.q_rope is not None:
            # MLA: scores = q.k + q_rope.k_rope; value (= key for absorbed MLA) gives Dv [DOC].
            qrb = _q_of(plan, plan.q_rope, b).to(f32)
            krb = _kv_of(plan, plan.k_rope, b).to(f32)[:, kv_head]
            scores = scores + torch.einsum("qhd,khd->hqk", qrb, krb)
        scores = scores * plan.scale  # scale multiplies q.k before the softmax [DOC]
        ok = _allowed(plan, b, sq, skv, device)
        if ok is not None:
            scores = scores.masked_fill(~ok, float("-inf"))
            dead = ~ok.any(dim=1)  # (sq,) rows with no visible key
            if bool(dead.any()):
                auto_fix = plan.sparse_mode == 3 and sq > skv
                if not (auto_fix or plan.inner_precise in (2, 3)):
                    raise NotImplementedError(
                        f"FIA model: batch {b} has fully masked query rows; their output is NOT FOUND "
                        "in the documentation without the invalid-row fix (inner_precise 2/3, or "
                        "automatic for sparse_mode=3 with Q_S > KV_S)"
                    )
        row_lse = torch.logsumexp(scores, dim=-1)  # (Nq, sq); -inf on fully masked rows
        safe = torch.where(torch.isfinite(row_lse), row_lse, torch.zeros_like(row_lse))
        probs = torch.exp(scores - safe[..., None])  # exp(-inf) = 0 on masked entries
        ob = torch.einsum("hqk,khd->qhd", probs, vb)
        # Fully masked rows (invalid-row fix): output 0 [INF; the fix's values are NOT FOUND].
        start, end = plan.q_spans[b]
        if plan.layout == "TND":
            out[start:end] = ob
            lse[start:end] = row_lse.transpose(0, 1)
        else:
            out[b, start:end] = ob
            lse[b, start:end] = row_lse.transpose(0, 1)
    return out, lse


def _finish(plan: _Plan, out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output in the query's layout and dtype; lse as documented."""
    if plan.layout == "BSH":
        out = out.reshape(out.shape[0], out.shape[1], plan.nq * plan.dv)
    elif plan.layout == "BNSD":
        out = out.transpose(1, 2)
    out = out.to(plan.out_dtype).contiguous()
    if not plan.softmax_lse_flag:
        # softmax_lse_flag=False: a shape-[1] tensor of value 0 [DOC].
        return out, torch.zeros(1, dtype=torch.float32, device=out.device)
    if plan.layout == "TND":
        lse = lse[..., None]  # (T, N, 1) [DOC]
    else:
        lse = lse.permute(0, 2, 1)[..., None]  # (B, N, S, 1) [DOC]
    return out, lse.contiguous()


def _call(op: str, query, key, value, kwargs: dict, other: dict):
    _record(
        op,
        query,
        kwargs["input_layout"],
        kwargs["sparse_mode"],
        kwargs["block_table"],
        kwargs["atten_mask"],
        {name: kwargs[name] for name in _LENGTH_ARGS},
    )
    return _prepare(query, key, value, **kwargs, other=other)


def npu_fused_infer_attention_score(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    atten_mask: torch.Tensor | None = None,
    actual_seq_lengths=None,
    actual_seq_lengths_kv=None,
    block_table: torch.Tensor | None = None,
    query_rope: torch.Tensor | None = None,
    key_rope: torch.Tensor | None = None,
    num_heads: int = 1,
    scale: float = 1.0,
    pre_tokens: int = INT_MAX,
    next_tokens: int = INT_MAX,
    input_layout: str = "BSH",
    num_key_value_heads: int = 0,
    sparse_mode: int = 0,
    inner_precise: int = 0,
    block_size: int = 0,
    softmax_lse_flag: bool = False,
    **other,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Model of ``torch_npu.npu_fused_infer_attention_score``: returns ``(attention_out, softmax_lse)``.

    ``attention_out`` has the query's shape with D replaced by value's D, in the query
    dtype. ``softmax_lse`` is fp32 ``(T, N, 1)`` (TND) or ``(B, N, S, 1)`` when
    ``softmax_lse_flag``, else a shape-[1] zero tensor.
    """
    kwargs = dict(
        atten_mask=atten_mask,
        actual_seq_lengths=actual_seq_lengths,
        actual_seq_lengths_kv=actual_seq_lengths_kv,
        block_table=block_table,
        query_rope=query_rope,
        key_rope=key_rope,
        num_heads=num_heads,
        scale=scale,
        pre_tokens=pre_tokens,
        next_tokens=next_tokens,
        input_layout=input_layout,
        num_key_value_heads=num_key_value_heads,
        sparse_mode=sparse_mode,
        inner_precise=inner_precise,
        block_size=block_size,
        softmax_lse_flag=softmax_lse_flag,
    )
    plan = _call("npu_fused_infer_attention_score", query, key, value, kwargs, other)
    return _finish(plan, *_run(plan))


def npu_fused_infer_attention_score_out(query, key, value, *, workspace=None, out=None, **kwargs):
    """Model of the graph-mode ``npu_fused_infer_attention_score.out(..., workspace=ws,
    out=[attn_out, softmax_lse])`` [CALL]: same math, written into ``out``.

    ``out[1]`` gets the lse when its shape matches (SGLang passes a shape-[1] buffer of
    the query dtype with softmax_lse_flag=False, which receives the zero)."""
    if not isinstance(out, (list, tuple)) or len(out) != 2:
        raise TypeError("out must be [attention_out, softmax_lse]")
    if workspace is not None and not isinstance(workspace, torch.Tensor):
        raise TypeError(f"workspace must be a tensor, got {describe_type(workspace)}")
    res, lse = npu_fused_infer_attention_score(query, key, value, **kwargs)
    for dst, src, what in ((out[0], res, "attention_out"), (out[1], lse, "softmax_lse")):
        if tuple(dst.shape) != tuple(src.shape):
            raise ValueError(f"out {what} has shape {tuple(dst.shape)}, the op produces {tuple(src.shape)}")
        dst.copy_(src)
    return out[0], out[1]


def get_max_workspace(query, key, value, **kwargs) -> torch.Tensor:
    """Model of ``torch_npu._npu_fused_infer_attention_score_get_max_workspace``.

    Validates the arguments exactly like the op model and returns a scratch buffer: the
    workspace is the NPU kernel's private scratch memory, which the model does not need;
    its size is not modelled (one byte)."""
    names = (
        "atten_mask", "actual_seq_lengths", "actual_seq_lengths_kv", "block_table", "query_rope",
        "key_rope", "num_heads", "scale", "pre_tokens", "next_tokens", "input_layout",
        "num_key_value_heads", "sparse_mode", "inner_precise", "block_size", "softmax_lse_flag",
    )
    defaults = dict(
        atten_mask=None, actual_seq_lengths=None, actual_seq_lengths_kv=None, block_table=None,
        query_rope=None, key_rope=None, num_heads=1, scale=1.0, pre_tokens=INT_MAX,
        next_tokens=INT_MAX, input_layout="BSH", num_key_value_heads=0, sparse_mode=0,
        inner_precise=0, block_size=0, softmax_lse_flag=False,
    )
    known = {n: kwargs.pop(n, defaults[n]) for n in names}
    _call("get_max_workspace", query, key, value, known, kwargs)
    return torch.empty(1, dtype=torch.uint8, device=query.device)
