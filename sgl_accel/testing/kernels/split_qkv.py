"""Pure-PyTorch model of sgl_kernel_npu's Triton
``sgl_kernel_npu.norm.split_qkv_rmsnorm_rope.split_qkv_rmsnorm_rope`` (npu-ops.md 3),
used by SGLang's DFlash draft attention on NPU, plus a builder for the sin/cos rows
that SGLang's NPU rotary embedding hands to it.

Nothing here was checked on an NPU; it models a reading of the kernel source.
"""

from __future__ import annotations

import torch

# Numerics of the deployed kernel. "fp32": sgl-kernel-npu #535 and later (tag
# 2026.06.15.post1): weights, bias, sin, cos and the normalised values stay fp32 until
# the final store. "bf16": the builds before #535: the normalised value is rounded to
# bf16 (whatever the input dtype) before RoPE, and RoPE runs in the dtypes of the
# loaded operands (bf16 x sin.dtype), each op rounded (INFERRED: Triton-Ascend rounds
# bf16 arithmetic per op, like torch on CPU).
SPLIT_QKV_PRECISION = "fp32"


def _next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _rows(t: torch.Tensor, tokens: int, rope_dim: int, name: str) -> torch.Tensor:
    # The kernel reads row t at ``ptr + t * rope_dim``: any contiguous tensor with
    # rope_dim as last dim and one row per token will do ([T, 1, 1, R] in SGLang).
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (the kernel reads it as flat rows)")
    if t.numel() < tokens * rope_dim:
        raise IndexError(f"{name} holds {t.numel() // rope_dim} rows for {tokens} tokens: out-of-bounds read")
    return t.reshape(-1)[: tokens * rope_dim].view(tokens, 1, rope_dim)


def _rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, neox: bool, work: torch.dtype | None):
    """x [T, heads, R]; sin/cos [T, 1, R] rows as loaded. ``work`` None: fp32 (post-#535)."""
    half = x.shape[-1] // 2
    if work is None:
        sin = sin.float()
        cos = cos.float()
    if not neox:
        # Interleaved mode uses only the first half of each row, each value twice.
        sin = sin[..., :half].repeat_interleave(2, dim=-1)
        cos = cos[..., :half].repeat_interleave(2, dim=-1)
    if neox:
        x1, x2 = x[..., :half], x[..., half:]
        rotated = torch.cat([-x2, x1], dim=-1)
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        rotated = torch.stack([-x2, x1], dim=-1).flatten(-2)
    return rotated * sin + x * cos


def _norm_rope(
    part: torch.Tensor,
    heads: int,
    head_dim: int,
    eps,
    weight,
    bias,
    use_bias: bool,
    sin_rows,
    cos_rows,
    neox: bool,
    precision: str,
    out_dtype: torch.dtype,
):
    tokens = part.shape[0]
    x = part.float().view(tokens, heads, head_dim)
    if eps is not None:
        variance = (x * x).sum(dim=-1, keepdim=True) / head_dim
        rstd = 1.0 / torch.sqrt(variance + float(eps))
        x = x * rstd * weight.float()
        if use_bias:
            x = x + bias.float()
    if precision == "bf16":
        x = x.to(torch.bfloat16)
        work = torch.bfloat16
    else:
        work = None
    rope_dim = sin_rows.shape[-1]
    rot = _rope(x[..., :rope_dim], sin_rows, cos_rows, neox, work)
    if rope_dim == head_dim:
        x = rot
    else:
        # Partial rotary: the rotated part is inserted back into the normalised block.
        x = torch.cat([rot.to(x.dtype), x[..., rope_dim:]], dim=-1)
    return x.reshape(tokens, heads * head_dim).to(out_dtype)


def split_qkv_rmsnorm_rope(
    input: torch.Tensor,
    sin: torch.Tensor,
    cos: torch.Tensor,
    q_hidden_size: int,
    kv_hidden_size: int,
    head_dim: int,
    eps: float | None = None,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    q_bias: torch.Tensor | None = None,
    k_bias: torch.Tensor | None = None,
    is_neox_style: bool = True,
    *,
    precision: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``input [T, q_hidden + 2 * kv_hidden]`` into q | k | v, RMS-normalise each
    q and k head (iff ``eps is not None``), apply RoPE to the first
    ``rope_dim = sin.shape[-1]`` dims of every q and k head, copy v.

    * asserts ``head_dim`` is a power of two and ``q_hidden % kv_hidden == 0``;
    * norm per head: ``x / sqrt(mean(x^2) + eps) * weight`` (weight as is, no ``1 + w``);
    * bias: the kernel's flag is ``q_bias is not None``; when set, q_bias is added to q
      *and k_bias to k* (a missing k_bias is then a null-pointer read: raises here);
      a k_bias without q_bias is ignored; biases only apply when eps is given;
    * neox (default): ``cat(-x2, x1) * sin + x * cos`` with full rope_dim sin/cos rows;
      interleaved: first half of each row, ``out[2i] = x[2i] c_i - x[2i+1] s_i``,
      ``out[2i+1] = x[2i+1] c_i + x[2i] s_i``;
    * ``precision`` (default ``SPLIT_QKV_PRECISION``): "fp32" (after #535) or "bf16"
      (before it; see the module constant);
    * returns new tensors ``q [T, q_hidden]``, ``k [T, kv_hidden]``, ``v [T, kv_hidden]``
      in input's dtype; no input is modified.
    """
    precision = SPLIT_QKV_PRECISION if precision is None else precision
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    assert _next_power_of_2(head_dim) == head_dim
    assert q_hidden_size % kv_hidden_size == 0
    if kv_hidden_size % head_dim != 0:
        # The grid has kv_hidden // head_dim columns: the remainder is never stored.
        raise ValueError("kv_hidden_size must be a multiple of head_dim (the kernel leaves the rest unwritten)")
    total = q_hidden_size + 2 * kv_hidden_size
    if input.dim() != 2 or input.shape[1] != total or not input.is_contiguous():
        raise ValueError(f"input must be a contiguous [T, {total}] tensor, got {tuple(input.shape)}")
    rope_dim = sin.shape[-1]
    if cos.shape[-1] != rope_dim:
        raise ValueError("sin and cos must have the same last dim")
    if rope_dim > head_dim or rope_dim < 2 or _next_power_of_2(rope_dim) != rope_dim:
        # tl.arange(0, ROPE_DIM) needs a power of two; the rope part must fit the head.
        raise ValueError(f"rope_dim {rope_dim} must be a power of two in [2, head_dim]")
    norms = eps is not None
    use_bias = q_bias is not None
    if norms and (q_weight is None or k_weight is None):
        raise ValueError("eps given: the kernel loads q_weight and k_weight")
    if norms and use_bias and k_bias is None:
        raise ValueError("q_bias given: the kernel also loads k_bias (null pointer here)")
    for name, t in (("q_weight", q_weight), ("k_weight", k_weight)):
        if norms and t.numel() < head_dim:
            raise ValueError(f"{name} needs head_dim values")

    tokens = input.shape[0]
    sin_rows = _rows(sin, tokens, rope_dim, "sin")
    cos_rows = _rows(cos, tokens, rope_dim, "cos")
    q_heads = q_hidden_size // head_dim
    kv_heads = kv_hidden_size // head_dim

    def flat(t):
        return None if t is None else t.reshape(-1)[:head_dim]

    q_in = input[:, :q_hidden_size]
    k_in = input[:, q_hidden_size : q_hidden_size + kv_hidden_size]
    v_in = input[:, q_hidden_size + kv_hidden_size :]
    q = _norm_rope(
        q_in, q_heads, head_dim, eps, flat(q_weight), flat(q_bias), use_bias,
        sin_rows, cos_rows, is_neox_style, precision, input.dtype,
    )
    k = _norm_rope(
        k_in, kv_heads, head_dim, eps, flat(k_weight), flat(k_bias), use_bias,
        sin_rows, cos_rows, is_neox_style, precision, input.dtype,
    )
    v = v_in.clone()
    return q, k, v


def npu_rope_cos_sin(
    positions: torch.Tensor,
    rotary_dim: int,
    base: float = 10000.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) laid out like SGLang's NPU ``RotaryEmbedding.get_cos_sin_with_position``
    (``position_cos`` / ``position_sin``): ``[T, 1, 1, rotary_dim]``, row =
    ``[c_0 .. c_{R/2-1}, c_0 .. c_{R/2-1}]`` with ``c_i = cos(pos * base^(-2i/R))``,
    computed in fp32 and cast to ``dtype`` (SGLang casts its cache to the model dtype
    off CUDA). Plain RoPE only (no scaling variants, 1-D positions).
    """
    if positions.dim() != 1:
        raise ValueError("1-D positions only")
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
    freqs = positions.to(torch.float)[:, None] * inv_freq[None, :]
    cos = freqs.cos().to(dtype)
    sin = freqs.sin().to(dtype)
    cos = torch.cat([cos, cos], dim=-1).view(-1, 1, 1, rotary_dim).contiguous()
    sin = torch.cat([sin, sin], dim=-1).view(-1, 1, 1, rotary_dim).contiguous()
    return cos, sin
