"""The split_qkv_rmsnorm_rope model (sgl_accel.testing.kernels.split_qkv).

Release-free: against the per-element formula written out below (python floats).
With a release (``@pytest.mark.sglang``): against sglang's own ``RMSNorm.forward_native``
applied per head and ``RotaryEmbedding.forward_native``, with sin/cos from the real
``RotaryEmbedding.get_cos_sin_with_position`` (what DFlash passes on NPU).
"""

import contextlib
import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sgl_accel.testing.kernels import split_qkv as sq
from sgl_accel.testing.kernels.split_qkv import npu_rope_cos_sin, split_qkv_rmsnorm_rope

SETTINGS = dict(max_examples=25, deadline=None)


# ----------------------------------------------------------------------------------
# Oracle: the formula, element by element
# ----------------------------------------------------------------------------------


def formula(inp, cos_rows, sin_rows, q_hidden, kv_hidden, head_dim, eps, qw, kw, qb, kb, neox):
    """Returns (q, k, v) as fp64 tensors and (q_mag, k_mag): sum of |terms| per output.

    cos_rows/sin_rows: [T, R] values as handed to the kernel. Norm per head:
    n_i = x_i / sqrt(sum_j x_j^2 / head_dim + eps) * w_i (+ b_i). RoPE on the first R:
    neox      out_i = n_i c_i - n_{i+R/2} s_i, out_{i+R/2} = n_{i+R/2} c_{i+R/2} + n_i s_{i+R/2}
    interleaved out_{2i} = n_{2i} c_i - n_{2i+1} s_i, out_{2i+1} = n_{2i+1} c_i + n_{2i} s_i.
    """
    rows = inp.double().tolist()
    cs, ss = cos_rows.double().tolist(), sin_rows.double().tolist()
    rope = len(cs[0])
    half = rope // 2

    def part(offset, heads, w, b):
        w = w.double().tolist() if w is not None else None
        b = b.double().tolist() if b is not None else None
        out, mag = [], []
        for t, row in enumerate(rows):
            o_row, m_row = [], []
            for h in range(heads):
                x = row[offset + h * head_dim : offset + (h + 1) * head_dim]
                if eps is not None:
                    ms = sum(v * v for v in x) / head_dim
                    r = 1.0 / math.sqrt(ms + eps)
                    n = [x[i] * r * w[i] + (b[i] if b is not None else 0.0) for i in range(head_dim)]
                else:
                    n = list(x)
                o = list(n)
                m = [abs(v) for v in n]
                c, s = cs[t], ss[t]
                for i in range(half):
                    if neox:
                        a, bb = i, i + half
                        o[a] = n[a] * c[a] - n[bb] * s[a]
                        o[bb] = n[bb] * c[bb] + n[a] * s[bb]
                        m[a] = abs(n[a] * c[a]) + abs(n[bb] * s[a])
                        m[bb] = abs(n[bb] * c[bb]) + abs(n[a] * s[bb])
                    else:
                        a, bb = 2 * i, 2 * i + 1
                        o[a] = n[a] * c[i] - n[bb] * s[i]
                        o[bb] = n[bb] * c[i] + n[a] * s[i]
                        m[a] = abs(n[a] * c[i]) + abs(n[bb] * s[i])
                        m[bb] = abs(n[bb] * c[i]) + abs(n[a] * s[i])
                o_row += o
                m_row += m
            out.append(o_row)
            mag.append(m_row)
        return torch.tensor(out, dtype=torch.float64), torch.tensor(mag, dtype=torch.float64)

    q, qm = part(0, q_hidden // head_dim, qw, qb)
    k, km = part(q_hidden, kv_hidden // head_dim, kw, kb)
    v = torch.tensor([row[q_hidden + kv_hidden :] for row in rows], dtype=torch.float64)
    return q, k, v, qm, km


REL = {torch.float32: 2.0**-20, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def assert_close(got, want, mag, dtype, rel=None):
    rel = REL[dtype] if rel is None else rel
    err = (got.double() - want).abs()
    tol = rel * want.abs() + 1e-5 * mag + 1e-6  # data are O(1): an absolute floor
    assert bool((err <= tol).all()), f"max excess {float((err - tol).max())}"


def within(got, want, mag, rel):
    """|got - want| <= rel * (|want| + sum of |terms|): a bound for rounding inside the sum."""
    err = (got.double() - want).abs()
    return bool((err <= rel * (want.abs() + mag) + 1e-6).all())


def case(seed, tokens, kv_heads, ratio, head_dim, dtype, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q_hidden, kv_hidden = kv_heads * ratio * head_dim, kv_heads * head_dim
    inp = (torch.randn(tokens, q_hidden + 2 * kv_hidden, generator=g) * scale).to(dtype)
    qw = (1 + 0.3 * torch.randn(head_dim, generator=g)).to(dtype)
    kw = (1 + 0.3 * torch.randn(head_dim, generator=g)).to(dtype)
    qb = (0.1 * torch.randn(head_dim, generator=g)).to(dtype)
    kb = (0.1 * torch.randn(head_dim, generator=g)).to(dtype)
    positions = torch.randint(0, 4096, (tokens,), generator=g)  # non-monotonic
    return g, q_hidden, kv_hidden, inp, qw, kw, qb, kb, positions


# ----------------------------------------------------------------------------------
# Release-free
# ----------------------------------------------------------------------------------


@settings(**SETTINGS)
@given(
    seed=st.integers(0, 2**31 - 1),
    tokens=st.integers(1, 4),
    kv_heads=st.integers(1, 2),
    ratio=st.sampled_from([1, 2, 4, 8]),
    head_dim=st.sampled_from([64, 128]),
    rope_div=st.sampled_from([1, 2, 4]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    eps=st.sampled_from([None, 1e-6, 1e-2]),
    scale=st.sampled_from([1.0, 1e-2]),
    bias=st.booleans(),
    neox=st.booleans(),
)
def test_matches_formula(seed, tokens, kv_heads, ratio, head_dim, rope_div, dtype, eps, scale, bias, neox):
    _, q_hidden, kv_hidden, inp, qw, kw, qb, kb, pos = case(seed, tokens, kv_heads, ratio, head_dim, dtype, scale)
    rope = head_dim // rope_div
    cos, sin = npu_rope_cos_sin(pos, rope, base=10000.0, dtype=dtype)
    norm = eps is not None
    inp_before = inp.clone()
    q, k, v = split_qkv_rmsnorm_rope(
        inp, sin, cos, q_hidden, kv_hidden, head_dim, eps=eps, q_weight=qw, k_weight=kw,
        q_bias=qb if bias else None, k_bias=kb if bias else None, is_neox_style=neox,
    )
    wq, wk, wv, qm, km = formula(
        inp, cos.view(tokens, rope), sin.view(tokens, rope), q_hidden, kv_hidden, head_dim,
        eps, qw, kw, qb if (bias and norm) else None, kb if (bias and norm) else None, neox,
    )
    assert q.dtype == k.dtype == v.dtype == dtype
    assert q.shape == (tokens, q_hidden) and k.shape == v.shape == (tokens, kv_hidden)
    assert_close(q, wq, qm, dtype)
    assert_close(k, wk, km, dtype)
    assert torch.equal(v.double(), wv) and v.data_ptr() != inp.data_ptr()
    assert torch.equal(inp, inp_before)


def test_bias_keyed_on_q_bias_only():
    """The kernel's BIAS flag is ``q_bias is not None``: a lone k_bias is ignored; a
    q_bias without k_bias would read a null pointer (raises here); no eps, no bias."""
    _, qh, kh, inp, qw, kw, qb, kb, pos = case(3, 3, 2, 2, 64, torch.float32)
    cos, sin = npu_rope_cos_sin(pos, 64)
    args = (inp, sin, cos, qh, kh, 64)
    plain = split_qkv_rmsnorm_rope(*args, eps=1e-6, q_weight=qw, k_weight=kw)
    lone_k = split_qkv_rmsnorm_rope(*args, eps=1e-6, q_weight=qw, k_weight=kw, k_bias=kb)
    both = split_qkv_rmsnorm_rope(*args, eps=1e-6, q_weight=qw, k_weight=kw, q_bias=qb, k_bias=kb)
    assert torch.equal(lone_k[1], plain[1])
    assert not torch.equal(both[1], plain[1]) and not torch.equal(both[0], plain[0])
    with pytest.raises(ValueError, match="k_bias"):
        split_qkv_rmsnorm_rope(*args, eps=1e-6, q_weight=qw, k_weight=kw, q_bias=qb)
    no_norm = split_qkv_rmsnorm_rope(*args)
    no_norm_bias = split_qkv_rmsnorm_rope(*args, q_bias=qb, k_bias=kb)
    assert all(torch.equal(a, b) for a, b in zip(no_norm, no_norm_bias))


def test_asserts():
    inp = torch.zeros(2, 96 * 3)
    cos, sin = npu_rope_cos_sin(torch.arange(2), 32)
    with pytest.raises(AssertionError):  # head_dim not a power of two
        split_qkv_rmsnorm_rope(inp, sin, cos, 96, 96, 96)
    inp = torch.zeros(2, 192 + 2 * 128)
    with pytest.raises(AssertionError):  # q_hidden % kv_hidden != 0
        split_qkv_rmsnorm_rope(inp, sin, cos, 192, 128, 64)


def test_pre535_precision_flag():
    """Before #535 the normalised value was rounded to bf16 even for fp16 input: the
    fp16 result is then only bf16-accurate; the fp32 path is fp16-accurate."""
    _, qh, kh, inp, qw, kw, qb, kb, pos = case(5, 4, 2, 2, 128, torch.float16)
    cos, sin = npu_rope_cos_sin(pos, 64, dtype=torch.float16)
    args = (inp, sin, cos, qh, kh, 128)
    kw_ = dict(eps=1e-6, q_weight=qw, k_weight=kw)
    wq, wk, _, qm, km = formula(inp, cos.view(4, 64), sin.view(4, 64), qh, kh, 128, 1e-6, qw, kw, None, None, True)
    new = split_qkv_rmsnorm_rope(*args, **kw_, precision="fp32")
    old = split_qkv_rmsnorm_rope(*args, **kw_, precision="bf16")
    assert within(new[0], wq, qm, 2.0**-11) and within(new[1], wk, km, 2.0**-11)
    assert not within(old[0], wq, qm, 2.0**-11)
    assert within(old[0], wq, qm, 2.0**-6) and within(old[1], wk, km, 2.0**-6)


def test_npu_cos_sin_layout():
    pos = torch.tensor([7, 0, 4095, 3])
    cos, sin = npu_rope_cos_sin(pos, 16, base=10000.0)
    assert cos.shape == sin.shape == (4, 1, 1, 16) and cos.is_contiguous()
    for t, p in enumerate(pos.tolist()):
        for i in range(8):
            ang = p * 10000.0 ** (-2 * i / 16)
            for col in (i, i + 8):  # halves duplicated
                assert abs(cos[t, 0, 0, col].item() - math.cos(ang)) < 2e-3
                assert abs(sin[t, 0, 0, col].item() - math.sin(ang)) < 2e-3


# ----------------------------------------------------------------------------------
# Against sglang's own layers
# ----------------------------------------------------------------------------------


@contextlib.contextmanager
def sglang_npu_rope_env():
    """sglang's RotaryEmbedding reads the global ServerArgs and picks its kernel by the
    module's hardware flags: give it default ServerArgs and emulate NPU (_is_npu)."""
    import sglang.srt.layers.rotary_embedding.base as rope_base
    import sglang.srt.server_args as server_args

    with pytest.MonkeyPatch.context() as mp:
        if server_args._global_server_args is None:
            args = object.__new__(server_args.ServerArgs)  # defaults, no __post_init__
            for f in dataclasses.fields(server_args.ServerArgs):
                if f.default is not dataclasses.MISSING:
                    setattr(args, f.name, f.default)
                elif f.default_factory is not dataclasses.MISSING:
                    setattr(args, f.name, f.default_factory())
            mp.setattr(server_args, "_global_server_args", args)
        mp.setattr(rope_base, "_is_npu", True)
        yield rope_base.RotaryEmbedding


def sglang_oracle(rope_cls, inp, pos, q_hidden, kv_hidden, head_dim, rope_dim, eps, qw, kw, neox, cache_dtype):
    """sglang in fp32: RMSNorm.forward_native per head, then RotaryEmbedding.forward_native
    with the cos/sin cache rounded to ``cache_dtype`` (as the NPU model dtype does)."""
    from sglang.srt.layers.layernorm import RMSNorm

    tokens = inp.shape[0]
    x = inp.float()
    q = x[:, :q_hidden].reshape(-1, head_dim)
    k = x[:, q_hidden : q_hidden + kv_hidden].reshape(-1, head_dim)
    if eps is not None:
        norms = []
        for w in (qw, kw):
            n = RMSNorm(head_dim, eps=eps)
            with torch.no_grad():
                n.weight.copy_(w.float())
            norms.append(n)
        q, k = norms[0].forward_native(q), norms[1].forward_native(k)
    rope = rope_cls(head_dim, rope_dim, 4096, 10000, neox, torch.float32)
    rope.cos_sin_cache = rope.cos_sin_cache.to(cache_dtype).float()
    q, k = rope.forward_native(pos, q.reshape(tokens, q_hidden), k.reshape(tokens, kv_hidden))
    return q, k


@pytest.mark.sglang
@settings(**SETTINGS)
@given(
    seed=st.integers(0, 2**31 - 1),
    tokens=st.integers(1, 4),
    kv_heads=st.integers(1, 2),
    ratio=st.sampled_from([1, 2, 4, 8]),
    head_dim=st.sampled_from([64, 128]),
    rope_div=st.sampled_from([1, 2, 4]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    eps=st.sampled_from([None, 1e-6, 1e-2]),
    neox=st.booleans(),
)
def test_matches_sglang_layers(seed, tokens, kv_heads, ratio, head_dim, rope_div, dtype, eps, neox):
    _, q_hidden, kv_hidden, inp, qw, kw, _, _, pos = case(seed, tokens, kv_heads, ratio, head_dim, dtype)
    rope_dim = head_dim // rope_div
    with sglang_npu_rope_env() as rope_cls:
        # What DFlash hands to the kernel on NPU: the model-dtype cache, via the real method.
        npu_rope = rope_cls(head_dim, rope_dim, 4096, 10000, neox, dtype)
        npu_rope.get_cos_sin_with_position(pos)
        sin, cos = npu_rope.position_sin, npu_rope.position_cos
        q, k, v = split_qkv_rmsnorm_rope(
            inp, sin, cos, q_hidden, kv_hidden, head_dim, eps=eps, q_weight=qw, k_weight=kw, is_neox_style=neox
        )
        want_q, want_k = sglang_oracle(rope_cls, inp, pos, q_hidden, kv_hidden, head_dim, rope_dim, eps, qw, kw,
                                       neox, dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(q, want_q, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k, want_k, rtol=1e-5, atol=1e-5)
    else:
        # The kernel computes in fp32 and rounds once: within a bf16 ulp of sglang-in-fp32.
        torch.testing.assert_close(q.float(), want_q, rtol=2.0**-7, atol=1e-4)
        torch.testing.assert_close(k.float(), want_k, rtol=2.0**-7, atol=1e-4)
    assert torch.equal(v, inp[:, q_hidden + kv_hidden :])


@pytest.mark.sglang
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_dim", [32, 128])
def test_cos_sin_builder_matches_sglang(dtype, rotary_dim):
    pos = torch.tensor([9, 2, 4000, 0, 2])
    with sglang_npu_rope_env() as rope_cls:
        rope = rope_cls(128, rotary_dim, 4096, 10000, True, dtype)
        rope.get_cos_sin_with_position(pos)
    cos, sin = npu_rope_cos_sin(pos, rotary_dim, base=10000, dtype=dtype)
    assert rope.position_cos.shape == cos.shape and rope.position_cos.dtype == dtype
    assert torch.equal(rope.position_cos, cos) and torch.equal(rope.position_sin, sin)


def test_module_precision_default_is_fp32(monkeypatch):
    _, qh, kh, inp, qw, kw, _, _, pos = case(8, 2, 1, 2, 64, torch.float16)
    cos, sin = npu_rope_cos_sin(pos, 64, dtype=torch.float16)
    args = (inp, sin, cos, qh, kh, 64)
    default = split_qkv_rmsnorm_rope(*args, eps=1e-6, q_weight=qw, k_weight=kw)
    fp32 = split_qkv_rmsnorm_rope(*args, eps=1e-6, q_weight=qw, k_weight=kw, precision="fp32")
    assert all(torch.equal(a, b) for a, b in zip(default, fp32))
    monkeypatch.setattr(sq, "SPLIT_QKV_PRECISION", "bf16")
    old = split_qkv_rmsnorm_rope(*args, eps=1e-6, q_weight=qw, k_weight=kw)
    assert not torch.equal(old[0], fp32[0])
