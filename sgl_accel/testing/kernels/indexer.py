"""Pure-PyTorch models of the GPU kernels the NSA indexer's ``_get_q_k_bf16`` and
``_get_k_bf16`` reach, for running the real ``Indexer`` where those kernels are not
there (CPU; a CUDA machine without sgl_kernel / sglang's JIT toolchain). Written for
any device: every tensor is made where its inputs live.

* :func:`apply_rope_with_cos_sin_cache_inplace`: sglang.jit_kernel.rope's fused
  in-place RoPE (what ``RotaryEmbedding.forward_cuda`` calls; ``rotary_embedding.base``
  imports it only on CUDA). A ``torch.library`` op, so the op counter and torch.compile
  see one opaque mutating op, as with the real kernel.
* :func:`hadamard_transform`: sglang.jit_kernel.hadamard's fast Walsh-Hadamard
  transform (what the indexer's ``rotate_activation`` imports on CUDA). Also a
  ``torch.library`` op.
* :func:`layernorm`: flashinfer.norm.layernorm, which sglang's ``LayerNorm.forward_cuda``
  (the indexer's ``k_norm``) calls for bf16 input with fp32 weights when flashinfer is
  importable. Wired to the flashinfer stand-in by ``sgl_accel.testing.standins``.

Oracles (tests/test_kernel_indexer.py): sglang's own ``forward_native`` of both RoPE
classes, ``scipy.linalg.hadamard``, and a float64 layer norm from its definition.
"""

from __future__ import annotations

import torch

__all__ = [
    "apply_rope_with_cos_sin_cache_inplace",
    "hadamard",
    "hadamard_transform",
    "layernorm",
    "rope_inplace",
]

_NS = "sgl_accel_indexer"


# --------------------------------------------------------------------------- RoPE


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """x (..., R) rotated by cos/sin (..., R/2): NeoX pairs (i, i + R/2), GPT-J (2i, 2i+1)."""
    half = x.shape[-1] // 2
    if is_neox:
        x1, x2 = x[..., :half], x[..., half:]
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    return torch.cat((o1, o2), -1) if is_neox else torch.stack((o1, o2), -1).flatten(-2)


@torch.library.custom_op(f"{_NS}::rope_inplace", mutates_args=("q", "k"))
def rope_inplace(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                 is_neox: bool) -> None:
    """``q`` (T, Hq, R) and ``k`` (T, Hk, R), views of any strides, rotated in place.

    ``cos_sin_cache`` (P, R) holds [cos | sin] per position. Math in fp32 (the CUDA
    kernel wants an fp32 cache; on ROCm/CPU sglang keeps it in the model dtype, so any
    float cache is accepted), results stored in the tensors' dtype. The kernel's work
    items are (token, head), q heads then k heads, each reading and writing its own
    row: q and k that are the same memory (``_get_k_bf16`` passes ``k_rope`` twice) are
    rotated once per role in a serial run, i.e. twice, which this model reproduces by
    rotating q, then k."""
    cos, sin = cos_sin_cache[positions.long()].float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    for t in (q, k):
        t.copy_(_rotate(t.float(), cos, sin, is_neox).to(t.dtype))


@rope_inplace.register_fake
def _(positions, q, k, cos_sin_cache, is_neox):
    return None


def apply_rope_with_cos_sin_cache_inplace(q, k, cos_sin_cache, positions, *, is_neox, rope_dim=0, fused_args=None):
    """Signature of sglang.jit_kernel.rope's function (the releases call it by keyword).
    Only plain in-place RoPE over the whole last dim is modelled; anything else raises."""
    if fused_args is not None:
        raise NotImplementedError("the reference models plain in-place RoPE only (no fused KV-cache store)")
    width = cos_sin_cache.shape[-1]
    if rope_dim not in (0, width) or q.shape[-1] != width or k.shape[-1] != width:
        raise NotImplementedError(
            f"the reference rotates whole rows: q {tuple(q.shape)}, k {tuple(k.shape)}, cache width {width}, "
            f"rope_dim {rope_dim}"
        )
    tokens = positions.shape[0] if positions.dim() == 1 else -1
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != tokens or k.shape[0] != tokens:
        raise ValueError(f"expected q (T, Hq, R), k (T, Hk, R), positions (T,); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(positions.shape)}")
    rope_inplace(positions, q, k, cos_sin_cache, bool(is_neox))


# --------------------------------------------------------------------------- Hadamard


@torch.library.custom_op(f"{_NS}::hadamard", mutates_args=())
def hadamard(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x @ H_n * scale`` along the last dim, H_n the Sylvester Hadamard matrix (n a
    power of two), by the fast Walsh-Hadamard butterflies: fp32 sums, x's dtype out."""
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size {n} is not a power of two")
    rows = x.numel() // n
    y = x.reshape(rows, n).float()
    h = 1
    while h < n:
        # Pairs (i, i + h) inside each block of 2h: (a, b) -> (a + b, a - b).
        blocks = y.reshape(rows, n // (2 * h), 2, h)
        a, b = blocks[:, :, 0, :], blocks[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2).reshape(rows, n)
        h *= 2
    return (y * scale).to(x.dtype).reshape(x.shape)


@hadamard.register_fake
def _(x, scale):
    return torch.empty_like(x)


def hadamard_transform(x, scale=1.0):
    """Signature of sglang.jit_kernel.hadamard's function."""
    return hadamard(x, float(scale))


# --------------------------------------------------------------------------- LayerNorm


def layernorm(input, gemma, beta, eps=1e-6):
    """flashinfer.norm.layernorm: rows of ``input`` (batch, hidden), bf16, normalised
    over the last dim with fp32 statistics, scaled by ``gemma`` and shifted by ``beta``
    (both (hidden,), fp32), returned in bf16. The argument contract is enforced (the
    kernel's is documented as such), so a caller off it fails here too."""
    if input.dim() != 2 or input.dtype != torch.bfloat16:
        raise ValueError(f"layernorm wants a 2-D bfloat16 input, got {tuple(input.shape)} {input.dtype}")
    hidden = input.shape[-1]
    for name, t in (("gemma", gemma), ("beta", beta)):
        if t.dtype != torch.float32 or tuple(t.shape) != (hidden,):
            raise ValueError(f"layernorm wants {name} float32 ({hidden},), got {tuple(t.shape)} {t.dtype}")
    x = input.float()
    mean = x.mean(-1, keepdim=True)
    centred = x - mean
    var = (centred * centred).mean(-1, keepdim=True)
    return (centred * torch.rsqrt(var + eps) * gemma + beta).to(input.dtype)
