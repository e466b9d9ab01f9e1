"""The NSA indexer's kernel references (sgl_accel.testing.kernels.indexer).

Release-free, on every device torch sees: the in-place RoPE against complex
multiplication in float64; the Hadamard transform against ``scipy.linalg.hadamard``;
the layer norm against its definition in float64; the torch.library registrations
(``torch.library.opcheck``); the flashinfer stand-in wiring. With a release
(``@pytest.mark.sglang``): the RoPE reference against sglang's own ``forward_native``
of both RoPE classes the indexer builds.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sgl_accel.testing import standins
from sgl_accel.testing.kernels import indexer as ref

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SETTINGS = dict(max_examples=25, deadline=None)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(shape, seed, dtype=torch.float32, device="cpu", scale=1.0):
    # Drawn on the CPU, so every device sees the same values.
    return (torch.randn(shape, generator=_gen(seed), dtype=torch.float64) * scale).to(dtype).to(device)


# --------------------------------------------------------------------------- RoPE


def _cache(positions, rope_dim, seed, dtype=torch.float32, device="cpu"):
    """[cos | sin] rows of random angles, with an amplitude as YaRN's mscale gives."""
    theta = torch.rand(positions, rope_dim // 2, generator=_gen(seed), dtype=torch.float64) * 6.3
    return (torch.cat((theta.cos(), theta.sin()), -1) * 1.2).to(dtype).to(device)


def _rope_oracle(x, cache, positions, is_neox, times=1):
    """Each pair (NeoX: i, i + R/2; GPT-J: 2i, 2i + 1) read as a complex number and
    multiplied by (cos + i sin) of its position, ``times`` times; float64."""
    x, table = x.double().cpu(), cache.double().cpu()[positions.cpu().long()]
    half = x.shape[-1] // 2
    w = torch.complex(table[:, None, :half], table[:, None, half:])
    if is_neox:
        z = torch.complex(x[..., :half], x[..., half:])
    else:
        z = torch.complex(x[..., 0::2], x[..., 1::2])
    for _ in range(times):
        z = z * w
    if is_neox:
        return torch.cat((z.real, z.imag), -1)
    return torch.stack((z.real, z.imag), -1).flatten(-2)


def _close(got, want, dtype):
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), **tol)


@pytest.mark.parametrize("device", DEVICES)
@settings(**SETTINGS)
@given(tokens=st.integers(0, 6), q_heads=st.integers(1, 4), k_heads=st.integers(1, 2),
       half=st.sampled_from([1, 4, 16, 32]), is_neox=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_rope_matches_complex_rotation_on_views(device, tokens, q_heads, k_heads, half, is_neox, dtype, seed):
    """q/k as the RoPE module hands them over: the first R lanes of wider heads, rotated
    in place; every other element of the buffers untouched."""
    rope_dim, extra, positions_total = 2 * half, 8, 40
    cache = _cache(positions_total, rope_dim, seed, device=device)
    positions = torch.randint(0, positions_total, (tokens,), generator=_gen(seed + 1)).to(device)
    query = _randn((tokens, q_heads, rope_dim + extra), seed + 2, dtype, device)
    key = _randn((tokens, k_heads, rope_dim + extra), seed + 3, dtype, device)
    q_before, k_before = query.clone(), key.clone()
    q, k = query[..., :rope_dim], key[..., :rope_dim]
    out = ref.apply_rope_with_cos_sin_cache_inplace(positions=positions, q=q, k=k, cos_sin_cache=cache,
                                                    is_neox=is_neox)
    assert out is None
    assert query.dtype == dtype and query.device.type == device
    _close(q, _rope_oracle(q_before[..., :rope_dim], cache, positions, is_neox), dtype)
    _close(k, _rope_oracle(k_before[..., :rope_dim], cache, positions, is_neox), dtype)
    assert torch.equal(query[..., rope_dim:], q_before[..., rope_dim:])
    assert torch.equal(key[..., rope_dim:], k_before[..., rope_dim:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("is_neox", [True, False])
def test_rope_same_memory_as_q_and_k_is_rotated_twice(device, is_neox):
    """``_get_k_bf16`` hands the kernel ``k_rope`` as both q and k (see rope_inplace)."""
    cache = _cache(16, 8, seed=7, device=device)
    positions = torch.tensor([3, 0, 15], device=device)
    key = _randn((3, 1, 8), 8, device=device)
    before = key.clone()
    ref.apply_rope_with_cos_sin_cache_inplace(positions=positions, q=key, k=key, cos_sin_cache=cache,
                                              is_neox=is_neox)
    _close(key, _rope_oracle(before, cache, positions, is_neox, times=2), torch.float32)


def test_rope_accepts_a_model_dtype_cache():
    """On ROCm/CPU sglang keeps the cache in the model dtype; the math stays fp32."""
    cache = _cache(10, 16, seed=3, dtype=torch.bfloat16)
    positions = torch.tensor([9, 2])
    q = _randn((2, 3, 16), 4)
    before = q.clone()
    ref.apply_rope_with_cos_sin_cache_inplace(positions=positions, q=q, k=q[:, :1].clone(), cos_sin_cache=cache,
                                              is_neox=True)
    _close(q, _rope_oracle(before, cache.float(), positions, True), torch.float32)


@pytest.mark.parametrize("kw", [dict(fused_args=object()), dict(rope_dim=4)])
def test_rope_refuses_what_it_does_not_model(kw):
    q = torch.zeros(2, 1, 8)
    with pytest.raises(NotImplementedError):
        ref.apply_rope_with_cos_sin_cache_inplace(positions=torch.zeros(2, dtype=torch.long), q=q, k=q.clone(),
                                                  cos_sin_cache=torch.zeros(4, 8), is_neox=True, **kw)


def test_rope_refuses_mismatched_shapes():
    with pytest.raises(ValueError):
        ref.apply_rope_with_cos_sin_cache_inplace(positions=torch.zeros(3, dtype=torch.long), q=torch.zeros(2, 1, 8),
                                                  k=torch.zeros(2, 1, 8), cos_sin_cache=torch.zeros(4, 8), is_neox=True)


# --------------------------------------------------------------------------- Hadamard


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 2, 8, 64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hadamard_matches_scipy(device, n, dtype):
    scipy_linalg = pytest.importorskip("scipy.linalg")
    x = _randn((6, 3, n), n, dtype, device)
    before = x.clone()
    scale = n**-0.5
    got = ref.hadamard_transform(x, scale=scale)
    oracle = x.double().cpu() @ torch.from_numpy(scipy_linalg.hadamard(n)).double() * scale
    assert got.shape == x.shape and got.dtype == dtype and got.device == x.device
    _close(got, oracle, dtype)
    assert torch.equal(x, before)


@pytest.mark.parametrize("device", DEVICES)
def test_hadamard_of_a_strided_view_and_of_no_rows(device):
    scipy_linalg = pytest.importorskip("scipy.linalg")
    base = _randn((5, 2, 32), 2, device=device)
    view = base[::2, :, :16]  # non-contiguous rows
    oracle = view.double().cpu() @ torch.from_numpy(scipy_linalg.hadamard(16)).double()
    _close(ref.hadamard_transform(view), oracle, torch.float32)  # default scale 1
    empty = torch.zeros(0, 4, 64, device=device)
    assert ref.hadamard_transform(empty, scale=0.5).shape == (0, 4, 64)


@pytest.mark.parametrize("n", [3, 12, 96])
def test_hadamard_refuses_other_sizes(n):
    with pytest.raises(ValueError, match="power of two"):
        ref.hadamard_transform(torch.zeros(2, n))


# --------------------------------------------------------------------------- LayerNorm


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,hidden", [(1, 128), (7, 128), (3, 64), (0, 32)])
def test_layernorm_matches_its_definition(device, rows, hidden):
    x = _randn((rows, hidden), rows + hidden, torch.bfloat16, device, scale=3.0) + 0.5
    gemma = 1.0 + _randn((hidden,), 1, device=device, scale=0.1)
    beta = _randn((hidden,), 2, device=device, scale=0.1)
    eps = 1e-6
    got = ref.layernorm(x, gemma, beta, eps)
    xd = x.double().cpu()
    mean = xd.mean(-1, keepdim=True)
    var = ((xd - mean) ** 2).mean(-1, keepdim=True)
    oracle = (xd - mean) / (var + eps).sqrt() * gemma.double().cpu() + beta.double().cpu()
    assert got.dtype == torch.bfloat16 and got.shape == x.shape and got.device == x.device
    _close(got, oracle, torch.bfloat16)


@pytest.mark.parametrize("case", ["3-d input", "fp16 input", "bf16 gemma", "short beta"])
def test_layernorm_refuses_what_the_kernel_refuses(case):
    x, g, b = torch.zeros(2, 8, dtype=torch.bfloat16), torch.ones(8), torch.zeros(8)
    if case == "3-d input":
        x = x[None]
    elif case == "fp16 input":
        x = x.half()
    elif case == "bf16 gemma":
        g = g.bfloat16()
    else:
        b = b[:4]
    with pytest.raises(ValueError):
        ref.layernorm(x, g, b)


# --------------------------------------------------------------------------- registrations


def test_ops_pass_torch_library_opcheck():
    """Schema (q, k declared mutated), fake kernels and AOT dispatch of both ops."""
    x = _randn((3, 4, 16), 1, torch.bfloat16)
    torch.library.opcheck(ref.hadamard, (x, 0.25))
    q, k = _randn((3, 2, 8), 2, torch.bfloat16), _randn((3, 1, 8), 3, torch.bfloat16)
    positions = torch.tensor([0, 5, 9])
    torch.library.opcheck(ref.rope_inplace, (positions, q, k, _cache(10, 8, 4), True))


def test_flashinfer_layernorm_stand_in_is_the_reference(standins_active):
    """What sglang's LayerNorm imports on CUDA (``from flashinfer.norm import layernorm``)."""
    from flashinfer.norm import layernorm

    assert not standins.is_placeholder(layernorm)
    x = _randn((4, 32), 5, torch.bfloat16)
    g, b = 1.0 + _randn((32,), 6, scale=0.1), _randn((32,), 7, scale=0.1)
    assert torch.equal(layernorm(x, g, b, 1e-5), ref.layernorm(x, g, b, 1e-5))


# --------------------------------------------------------------------------- against sglang


@pytest.mark.sglang
@pytest.mark.parametrize("scaling", ["deepseek_yarn", "none"])
@pytest.mark.parametrize("neox", [True, False])
def test_rope_reference_matches_sglang_forward_native(monkeypatch, scaling, neox):
    """The rotary modules the indexer really builds (sgl_accel.cases.nsa_indexer_fusion)."""
    from sglang.srt import server_args

    from sgl_accel.cases import nsa_indexer_fusion as cases

    monkeypatch.setattr(server_args, "_global_server_args", None)  # the builder makes its own
    spec = cases.Spec("_get_q_k_bf16", "native", tokens=6, scaling=scaling, neox=neox)
    rotary = cases.build(spec, seed=0, device="cpu").indexer.rotary_emb
    gen = _gen(5)
    positions = torch.randint(0, spec.max_position, (6,), generator=gen)
    q = torch.randn(6, 4, spec.rope_dim, generator=gen)
    k = torch.randn(6, 1, spec.rope_dim, generator=gen)
    want_q, want_k = rotary.forward_native(positions, q.clone(), k.clone())
    got_q, got_k = q.clone(), k.clone()
    ref.apply_rope_with_cos_sin_cache_inplace(positions=positions, q=got_q, k=got_k,
                                              cos_sin_cache=rotary.cos_sin_cache, is_neox=neox)
    torch.testing.assert_close(got_q, want_q.reshape(got_q.shape), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k, want_k.reshape(got_k.shape), rtol=1e-5, atol=1e-5)
