"""Pure-PyTorch models of the causal-conv1d *update* ops used by SGLang's Ascend
GDN / Mamba backends for the speculative target-verify step.

Three functions:

* ``causal_conv1d_update_reference`` - the mathematics, nothing else.
* ``causal_conv1d_update_ascendc`` - a model of the AscendC op
  ``torch.ops.npu.causal_conv1d_update`` (sgl-kernel-npu ``csrc/causal_conv1d_update``),
  called by SGLang 0.5.11, *including its known deviations* from the mathematics.
* ``causal_conv1d_update_v2`` - a model of the Triton kernel
  ``sgl_kernel_npu.mamba.causal_conv1d.causal_conv1d_update_v2`` (SGLang >= 0.5.12).

Semantics follow docs of the shared reference (npu-ops.md section 2) and a reading of
the sgl-kernel-npu sources; nothing here was checked on an NPU. Points marked
INFERRED are hypotheses about device behaviour that the sources do not settle.

Layouts (both NPU ops): x ``[batch, seq, dim]``, weight ``[width, dim]``,
conv_state ``[lines, state_len, dim]`` (dim contiguous).
"""

from __future__ import annotations

import torch

# Builds of sgl-kernel-npu with #428 (tags >= 2026.04.15.rc2, i.e. what SGLang
# 0.5.11 is deployed with) pre-shift the conv state on the host before the
# AscendC kernel runs. Set to False to model the older builds.
ASCENDC_PRESHIFT = True

# Vector (AIV) cores the AscendC op spreads the batch over: min(cores, batch)
# blocks. Only matters when batch > cores (the pad-row x-offset skew lives in
# blocks that handle several items). INFERRED: 48 = Atlas A3 / 910B1-B2 AIV count;
# 910B3/B4 report 40.
ASCENDC_NUM_VECTOR_CORES = 48

# Value written into output rows that the AscendC op never stores (its output is
# ``at::empty_like(x)``): NaN, so that a caller reading them is visible in tests.
UNINITIALISED = float("nan")


def _is_silu(activation) -> bool:
    if activation is None or activation is False:
        return False
    if activation is True:
        return True
    if activation in ("silu", "swish"):
        return True
    raise ValueError(f"unsupported activation {activation!r} (None, 'silu', 'swish' or a bool)")


def _silu(a: torch.Tensor) -> torch.Tensor:
    # Both NPU kernels compute SiLU as a / (1 + exp(-a)).
    return a / (1.0 + torch.exp(-a))


# --------------------------------------------------------------------------------------
# Mathematical reference
# --------------------------------------------------------------------------------------


def causal_conv1d_update_reference(
    x: torch.Tensor,
    lines: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative verify step, as mathematics (SGLang-NPU right-aligned convention).

    x:      ``[B, S, dim]`` the S draft tokens of each request.
    lines:  ``[B, state_len, dim]`` each request's conv-state line (``state_len >= W-1``);
            the valid history is its last ``W-1`` slots.
    weight: ``[W, dim]``; bias ``[dim]`` or None; activation None/'silu'/'swish'/bool.

    ``y[b, t] = act(bias + sum_j weight[j] * seq[b, t + j])`` with
    ``seq = cat(lines[:, -(W-1):], x)``, computed in fp32 (fp64 for fp64 inputs) and
    returned in x's dtype; the new line is ``cat(line, x)[-state_len:]`` (the whole
    line, which ``conv_state_rollback`` later reads). Returns ``(y, new_lines)``; the
    inputs are not modified.
    """
    if x.dim() != 3 or lines.dim() != 3 or weight.dim() != 2:
        raise ValueError("expected x [B, S, dim], lines [B, state_len, dim], weight [W, dim]")
    batch, seq, dim = x.shape
    width = weight.shape[0]
    state_len = lines.shape[1]
    if lines.shape[0] != batch or lines.shape[2] != dim or weight.shape[1] != dim:
        raise ValueError("shape mismatch between x, lines and weight")
    if state_len < width - 1:
        raise ValueError(f"state_len {state_len} < width-1 = {width - 1}")
    wide = torch.float64 if torch.float64 in (x.dtype, lines.dtype, weight.dtype) else torch.float32
    history = lines[:, state_len - (width - 1) :, :].to(wide)
    seq_all = torch.cat([history, x.to(wide)], dim=1)  # [B, W-1+S, dim]
    acc = torch.zeros(batch, seq, dim, dtype=wide)
    if bias is not None:
        acc = acc + bias.to(wide)
    w = weight.to(wide)
    for j in range(width):
        acc = acc + w[j] * seq_all[:, j : j + seq, :]
    if _is_silu(activation):
        acc = _silu(acc)
    new_lines = torch.cat([lines, x.to(lines.dtype)], dim=1)[:, -state_len:, :].clone()
    return acc.to(x.dtype), new_lines


# --------------------------------------------------------------------------------------
# Helpers shared by the models
# --------------------------------------------------------------------------------------


def _round_half_away(acc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 -> bf16/fp16 with ties away from zero (AscendC ``RoundMode::CAST_ROUND``).

    torch rounds ties to even; the two differ only on exact ties. Overflow gives inf
    (INFERRED: the device's saturation mode is not documented for this cast).
    """
    nearest = acc.to(dtype)
    wide = acc.double()
    near = nearest.double()
    # Next representable value one step further from zero: same sign, magnitude + 1 ulp.
    further = (nearest.view(torch.int16) + 1).view(dtype)
    tie = (wide.abs() > near.abs()) & ((wide - near).abs() == (further.double() - wide).abs())
    return torch.where(tie, further, nearest)


def _int32_words(t: torch.Tensor, name: str) -> list[int]:
    """The AscendC kernel reads index tensors as ``GlobalTensor<int32_t>``.

    int32 reads as given. int64 is *misread* as its little-endian 32-bit words (element
    b of the kernel's view is word b), as the raw device pointer would be
    (INFERRED, npu-ops.md 6.7).
    """
    if not t.is_contiguous():
        raise ValueError(f"{name}: the kernel reads raw memory; pass a contiguous tensor")
    if t.dtype == torch.int32:
        return t.reshape(-1).tolist()
    if t.dtype == torch.int64:
        return t.reshape(-1).view(torch.int32).tolist()
    raise TypeError(f"{name}: dtype {t.dtype} is not read meaningfully by the kernel (int32 expected)")


class _FlatRows:
    """Row access to a ``[..., dim]`` tensor by flat row number, writing through to it.

    The kernels address the state by ``line * state_len + slot`` without clamping the
    slot to the line, so an out-of-line slot lands in a neighbouring line. Addresses
    outside the tensor are undefined behaviour on the device: raise.
    """

    def __init__(self, t: torch.Tensor, what: str):
        self.rows = t.view(-1, t.shape[-1])
        self.what = what

    def _check(self, r: int) -> None:
        if not 0 <= r < self.rows.shape[0]:
            raise IndexError(
                f"{self.what}: row {r} outside [0, {self.rows.shape[0]}) - out-of-bounds access on the device"
            )

    def get(self, r: int) -> torch.Tensor:
        self._check(r)
        return self.rows[r].clone()

    def set(self, r: int, value: torch.Tensor) -> None:
        self._check(r)
        self.rows[r] = value


# --------------------------------------------------------------------------------------
# AscendC op  torch.ops.npu.causal_conv1d_update
# --------------------------------------------------------------------------------------


def causal_conv1d_update_ascendc(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    conv_state_indices: torch.Tensor,
    bias: torch.Tensor | None = None,
    num_accepted_tokens: torch.Tensor | None = None,
    query_start_loc: torch.Tensor | None = None,
    activation_mode: bool = False,
    pad_slot_id: int = -1,
    *,
    pre_shift: bool | None = None,
    num_vector_cores: int | None = None,
) -> torch.Tensor:
    """Model of ``torch.ops.npu.causal_conv1d_update`` (npu-ops.md 2.2).

    Returns a new tensor shaped like x (x is not modified); ``conv_state`` is mutated
    in place. Faithful to the op, deviations included:

    * host pre-shift (``pre_shift``, default ``ASCENDC_PRESHIFT``: builds with #428):
      ``line[0:VAL] = line[S:S+VAL]``, ``VAL = state_len - S``, on every indexed line,
      pad indices clamped to line 0 (so line 0 is pre-shifted when a pad is present);
      without indices on every line of the pool;
    * the kernel's rolling window at slot offset ``num_accepted - 1`` (0 without
      ``num_accepted_tokens``), and the append loop for tokens beyond num_accepted;
      slot addresses are not clamped to the line (a neighbouring line is hit);
    * fp32 accumulation of bf16/fp16 operands, cast back with ties away from zero;
    * pad entries (``index == pad_slot_id``) are skipped: their output rows are never
      written (``UNINITIALISED`` = NaN here, ``empty_like`` garbage on the device);
    * INFERRED pad-row skew: the kernel skips a pad entry before advancing its x/y row
      offset, so later items handled by the same vector core read x rows, and write y
      rows, one pad-length too early (``num_vector_cores``, default
      ``ASCENDC_NUM_VECTOR_CORES``, decides which items share a core);
    * index tensors are read as int32 (int64 is misread, see ``_int32_words``).

    Builds without #428 (``pre_shift=False``) also left the kernel's pad_slot_id
    uninitialised, so pad entries are undefined there: this model raises on them.
    ``activation_mode`` True means SiLU. The schema's ``conv_state_indices`` is not
    optional: pass an empty tensor for "no indices" (line b for item b).
    """
    if pre_shift is None:
        pre_shift = ASCENDC_PRESHIFT
    cores = ASCENDC_NUM_VECTOR_CORES if num_vector_cores is None else int(num_vector_cores)
    if conv_state_indices is None:
        raise TypeError("conv_state_indices is a required Tensor in the op schema (use an empty tensor)")

    # Host checks (op_host/causal_conv1d_update.cpp).
    if x.dim() != 3:
        raise ValueError(f"x must be 3D tensor [batch, seq_len, dim], got shape {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2D tensor [width, dim], got shape {tuple(weight.shape)}")
    if conv_state.dim() != 3:
        raise ValueError(f"conv_state must be 3D tensor [cache_len, width-1, dim], got {tuple(conv_state.shape)}")
    dtype = x.dtype
    if dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"Only BF16 and FP16 are supported, got {dtype}")
    if weight.dtype != dtype or conv_state.dtype != dtype:
        raise TypeError("weight and conv_state dtype must match x dtype")
    if not (x.is_contiguous() and weight.is_contiguous() and conv_state.is_contiguous()):
        raise ValueError("x, weight and conv_state must be contiguous")
    batch, seq_len, dim = x.shape
    width = weight.shape[0]
    state_len = conv_state.shape[1]
    if weight.shape[1] != dim or conv_state.shape[2] != dim:
        raise ValueError("weight / conv_state last dim must equal x's dim")

    has_indices = conv_state_indices.numel() > 0
    has_bias = bias is not None and bias.numel() > 0
    has_num_accept = num_accepted_tokens is not None and num_accepted_tokens.numel() > 0
    has_query_loc = query_start_loc is not None and query_start_loc.numel() > 0
    if has_bias and (bias.dtype != dtype or bias.numel() < dim):
        # The kernel reinterprets the bias buffer as x's dtype.
        raise TypeError("bias must hold dim values of x's dtype")

    y = torch.full_like(x, UNINITIALISED)  # at::empty_like(x)

    # ---- host pre-shift (#428) -------------------------------------------------------
    val_shift = state_len - seq_len
    if pre_shift:
        if val_shift > 0:
            if has_indices:
                safe = conv_state_indices.to(torch.long).clamp_min(0)
                snap = conv_state.index_select(0, safe)
                snap[:, :val_shift] = snap[:, seq_len : seq_len + val_shift].clone()
                conv_state.index_copy_(0, safe, snap)
            else:
                conv_state[:, :val_shift] = conv_state[:, seq_len : seq_len + val_shift].clone()
    elif has_indices and bool((conv_state_indices.to(torch.long) == pad_slot_id).any()):
        raise RuntimeError(
            "builds without sgl-kernel-npu #428 never passed pad_slot_id to the kernel "
            "(uninitialised tiling field): pad entries are undefined behaviour"
        )

    # ---- kernel ----------------------------------------------------------------------
    idx = _int32_words(conv_state_indices, "conv_state_indices") if has_indices else None
    nacc_words = _int32_words(num_accepted_tokens, "num_accepted_tokens") if has_num_accept else None
    qsl = _int32_words(query_start_loc, "query_start_loc") if has_query_loc else None

    state = _FlatRows(conv_state, "conv_state")
    x_rows = _FlatRows(x, "x")
    y_rows = _FlatRows(y, "y")
    w32 = weight.float()
    b32 = bias.reshape(-1)[:dim].float() if has_bias else None
    silu = bool(activation_mode)

    def finish(acc: torch.Tensor) -> torch.Tensor:
        if b32 is not None:
            acc = b32 + acc
        if silu:
            acc = _silu(acc)
        return _round_half_away(acc, dtype)

    num_core = max(1, min(cores, batch))
    block_factor = batch // num_core
    tail_factor = batch - block_factor * (num_core - 1)
    for core in range(num_core):
        first = core * block_factor
        count = tail_factor if core == num_core - 1 else block_factor
        x_off = qsl[first] if has_query_loc else first * seq_len  # in rows of dim
        in_off = 0  # inStateOffset_: stays 0 without num_accepted_tokens
        for i in range(count):
            b = first + i
            if has_indices:
                slot = idx[b]
                if slot == pad_slot_id:
                    continue  # skips the x_off advance below (pad-row skew, INFERRED)
                base = slot * state_len
            else:
                base = b * state_len
            act = (qsl[b + 1] - qsl[b]) if has_query_loc else seq_len
            n_acc = act
            if has_num_accept:
                n_acc = nacc_words[b]
                in_off = n_acc - 1
            calc = min(n_acc, act)
            # Rolling window at slots [in_off, in_off + W - 1): each step shifts it one
            # slot to the left and appends the token at its right end.
            for j in range(calc):
                acc = torch.zeros(dim, dtype=torch.float32)
                for k in range(width - 1):
                    v = state.get(base + k + in_off)
                    if k + in_off != 0:
                        state.set(base + k + in_off - 1, v)
                    acc = acc + v.float() * w32[k]
                xv = x_rows.get(x_off + j)
                state.set(base + in_off + width - 2, xv)
                acc = acc + xv.float() * w32[width - 1]
                y_rows.set(x_off + j, finish(acc))
            # Tokens beyond num_accepted: appended after the window, no shift.
            for j in range(act - calc):
                acc = torch.zeros(dim, dtype=torch.float32)
                for k in range(width - 1):
                    acc = acc + state.get(base + k + in_off + j).float() * w32[k]
                xv = x_rows.get(x_off + calc + j)
                state.set(base + in_off + width - 1 + j, xv)
                acc = acc + xv.float() * w32[width - 1]
                y_rows.set(x_off + calc + j, finish(acc))
            x_off += act
    return y


# --------------------------------------------------------------------------------------
# Triton v2  sgl_kernel_npu.mamba.causal_conv1d.causal_conv1d_update_v2
# --------------------------------------------------------------------------------------

_V2_MAX_WIDTH = 6  # the kernel has weight/history registers for widths 1..6 only


def causal_conv1d_update_v2(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation=None,
    conv_state_indices: torch.Tensor | None = None,
    num_accepted_tokens: torch.Tensor | None = None,
    query_start_loc: torch.Tensor | None = None,
    max_query_len: int = -1,
    pad_slot_id: int | None = -1,
    block_idx_last_scheduled_token: torch.Tensor | None = None,
    initial_state_idx: torch.Tensor | None = None,
    validate_data: bool = False,
) -> torch.Tensor:
    """Model of sgl_kernel_npu's Triton ``causal_conv1d_update_v2`` (npu-ops.md 2.3).

    x: ``[B, dim]``, ``[B, S, dim]`` or varlen ``[tokens, dim]`` (with query_start_loc
    and max_query_len); conv_state ``[lines, state_len, dim]`` (any strides, updated in
    place through the tensor object given - a ``.contiguous()`` copy made by a caller
    receives the update, the original does not); weight ``[W, dim]``, W <= 6.

    * ``x = x.to(conv_state.dtype)``; the result is written into that tensor (x's own
      storage when the dtypes already agree) and returned ``.to(original dtype)``;
    * spec mode (num_accepted_tokens given): history = ``line[n-1 : n-1+W-1]``, new
      ``line[:W-2] = old[n : n+W-2]``, ``line[W-2 : W-2+S] = x``; non-spec: history =
      ``line[:W-1]``, ``line[:W-1] = cat(old[:W-1], x)[-(W-1):]``; varlen shortens the
      run state length by ``max_query_len - S_b``;
    * history and x are cast to fp16 before the multiply, even for bf16 (values beyond
      fp16 range become +-inf), weights and bias fp32, fp32 accumulation;
    * items whose input line is pad_slot_id, or with S_b == 0, write nothing (their rows
      of the returned tensor keep x's values);
    * APC: input line ``conv_state_indices[b, initial_state_idx[b]]``, output line
      ``conv_state_indices[b, block_idx_last_scheduled_token[b]]``.

    Items run in parallel on the device; this model runs them in batch order (items
    sharing a line race there). Reading a line outside the pool is undefined: raise.
    """
    if validate_data:
        assert pad_slot_id is not None
        assert x.stride(1) == 1
    silu = _is_silu(activation)
    if conv_state_indices is None:
        # The kernel dereferences conv_state_indices unconditionally.
        raise ValueError("causal_conv1d_update_v2 needs conv_state_indices (the kernel always reads it)")

    original_dtype = x.dtype
    x = x.to(conv_state.dtype)
    unsqueeze = query_start_loc is None and x.dim() == 2
    if unsqueeze:
        x = x.unsqueeze(1)
    varlen = query_start_loc is not None
    if varlen:
        batch = conv_state_indices.size(0)
        dim = x.size(1)
        seqlen = int(max_query_len)
    else:
        batch, seqlen, dim = x.shape
    width = weight.shape[0]
    if not 1 <= width <= _V2_MAX_WIDTH:
        raise NotImplementedError(f"the v2 kernel handles widths 1..{_V2_MAX_WIDTH}, got {width}")
    num_lines, state_len_total, _ = conv_state.shape
    out = x  # overwrite-on-x

    spec = num_accepted_tokens is not None
    apc = block_idx_last_scheduled_token is not None
    eff_state_len = (width - 1 + (seqlen - 1)) if spec else (width - 1)

    if not conv_state_indices.is_contiguous():
        raise ValueError("conv_state_indices: pass a contiguous tensor (the model indexes it flat)")
    idx_flat = conv_state_indices.reshape(-1).tolist()
    idx_stride = conv_state_indices.stride(0)
    n_acc = num_accepted_tokens.tolist() if spec else None
    qsl = query_start_loc.tolist() if varlen else None
    init_idx = initial_state_idx.tolist() if apc else None
    last_idx = block_idx_last_scheduled_token.tolist() if apc else None

    w32 = weight.float()
    acc0 = bias.float() if bias is not None else torch.zeros(dim, dtype=torch.float32)

    def line_slot(line: int, slot: int, write: bool) -> tuple[int, int] | None:
        if 0 <= slot < state_len_total:
            return line, slot
        if conv_state.is_contiguous():  # the address spills into a neighbouring line
            flat = line * state_len_total + slot
            if 0 <= flat < num_lines * state_len_total:
                return divmod(flat, state_len_total)
        raise IndexError(f"conv_state slot {slot} of line {line}: out-of-bounds {'write' if write else 'read'}")

    def read(line: int, slot: int) -> torch.Tensor:
        ln, sl = line_slot(line, slot, False)
        return conv_state[ln, sl].clone()

    def write(line: int, slot: int, value: torch.Tensor) -> None:
        ln, sl = line_slot(line, slot, True)
        conv_state[ln, sl] = value

    for b in range(batch):
        in_line = idx_flat[b * idx_stride + (init_idx[b] if apc else 0)]
        if pad_slot_id is not None and in_line == pad_slot_id:
            continue
        if varlen:
            qs, qe = qsl[b], qsl[b + 1]
            seqlen_b = qe - qs
            if seqlen_b > seqlen:
                # The kernel's unrolled copy loops are sized by max_query_len.
                raise ValueError(f"max_query_len {seqlen} < length {seqlen_b} of item {b}: not modelled")
            state_len_run = eff_state_len - (seqlen - seqlen_b)
            tokens = [qs + t for t in range(max(seqlen_b, 0))]

            def x_row(t, _tokens=tokens):
                return out[_tokens[t]]

            def set_out(t, v, _tokens=tokens):
                out[_tokens[t]] = v

        else:
            seqlen_b = seqlen
            state_len_run = eff_state_len

            def x_row(t, _b=b):
                return out[_b, t]

            def set_out(t, v, _b=b):
                out[_b, t] = v

        if seqlen_b <= 0:
            continue
        if not 0 <= in_line < num_lines:
            # The history load is unmasked: reading outside the pool is undefined.
            raise IndexError(f"item {b}: conv state line {in_line} outside [0, {num_lines})")
        out_line = idx_flat[b * idx_stride + (last_idx[b] if apc else 0)]
        if out_line < 0:
            raise IndexError(f"item {b}: output line {out_line} (negative) - out-of-bounds write")
        state_writes = out_line < num_lines  # the kernel masks these stores

        off = (n_acc[b] - 1) if spec else 0
        shift = 1 if spec else seqlen_b

        # STEP 1: history, read before any state write, as fp16.
        cols = [read(in_line, off + k).to(torch.float16) for k in range(width - 1)]
        xs = [x_row(t).clone() for t in range(seqlen_b)]

        # STEP 2: state update.
        if state_writes:
            if seqlen_b < state_len_run:
                keep = state_len_run - seqlen_b
                moved = [
                    (d, read(in_line, off + shift + d)) for d in range(keep) if d + shift < state_len_run
                ]
                for d, v in moved:
                    write(out_line, d, v)
                for t in range(seqlen_b):
                    write(out_line, keep + t, xs[t])
            else:
                tail = seqlen_b - state_len_run
                for d in range(max(state_len_run, 0)):
                    write(out_line, d, xs[tail + d])

        # STEP 3: the convolution, one token at a time, rolling the fp16 window.
        for t in range(seqlen_b):
            acc = acc0.clone()
            xt = xs[t].to(torch.float16)
            for j in range(width - 1):
                acc = acc + cols[j].float() * w32[j]
            acc = acc + xt.float() * w32[width - 1]
            if width > 1:
                cols = cols[1:] + [xt]
            if silu:
                acc = _silu(acc)
            set_out(t, acc.to(out.dtype))

    if unsqueeze:
        out = out.squeeze(1)
    return out.to(original_dtype)
