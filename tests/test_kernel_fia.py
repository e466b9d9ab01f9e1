"""The FIA model (sgl_accel.testing.kernels.fia) against an independent oracle.

Oracle: torch.nn.functional.scaled_dot_product_attention, one sequence at a time, over
contiguous (un-paged) K/V, with boolean masks built here from torch.tril / torch.triu.
Inputs for the model are packed (TND), padded (BSND/BSH/BNSD) and paged (shuffled
physical blocks, NaN-filled unused slots) by this file's own code. Release-free.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sgl_accel.testing.kernels import fia

FIA = fia.npu_fused_infer_attention_score
TEMPLATE = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)  # True = masked
SETTINGS = dict(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------ oracle


def oracle(q, k, v, scale, allowed=None, q_rope=None, k_rope=None):
    """One sequence: q (Sq, Nq, D), k (Skv, Nkv, D), v (Skv, Nkv, Dv), allowed (Sq, Skv) bool
    (True = may attend) or None. Returns out (Sq, Nq, Dv) fp32 and lse (Sq, Nq) fp32."""
    q, k, v = q.float(), k.float(), v.float()
    group = q.shape[1] // k.shape[1]
    k = torch.repeat_interleave(k, group, dim=1)  # grouped GQA (the assumed mapping)
    v = torch.repeat_interleave(v, group, dim=1)
    if q_rope is not None:
        q = torch.cat([q, q_rope.float()], dim=-1)
        k = torch.cat([k, torch.repeat_interleave(k_rope.float(), group, dim=1)], dim=-1)
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=scale)
    scores = (qh @ kh.transpose(-1, -2)) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return out.transpose(0, 1), lse.transpose(0, 1)


def bottom_right_causal(sq, skv):
    return torch.ones(sq, skv, dtype=torch.bool).tril(diagonal=skv - sq)


def top_left_causal(sq, skv):
    return torch.ones(sq, skv, dtype=torch.bool).tril(diagonal=0)


def tolerances(dtype):
    return dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)


# ------------------------------------------------------------------------------ paging


def page(families, block_size, fmt, gen, spare=2):
    """Scatter per-sequence (L_b, N, D) tensors into shuffled pools sharing one block table.

    families: lists of per-sequence tensors with equal lengths (e.g. keys, values, key ropes).
    fmt: "3d" (blocks, bs, N*D), "4d" (blocks, N, bs, D), "nz" (blocks, N, D/16, bs, 16).
    Unused slots hold NaN so that any read of them poisons the result."""
    lens = [s.shape[0] for s in families[0]]
    need = [max(1, -(-n // block_size)) for n in lens]
    total = sum(need) + spare
    perm = torch.randperm(total, generator=gen).tolist()
    table = torch.zeros(len(lens), max(need) + 1, dtype=torch.int32)
    it = iter(perm)
    for b in range(len(lens)):
        for blk in range(need[b]):
            table[b, blk] = next(it)
    pools = []
    for seqs in families:
        n, d = seqs[0].shape[1], seqs[0].shape[2]
        shape = {"3d": (total, block_size, n * d), "4d": (total, n, block_size, d),
                 "nz": (total, n, d // 16, block_size, 16)}[fmt]
        pool = torch.full(shape, float("nan"), dtype=seqs[0].dtype)
        for b, s in enumerate(seqs):
            for t in range(s.shape[0]):
                phys, off = int(table[b, t // block_size]), t % block_size
                if fmt == "3d":
                    pool[phys, off] = s[t].reshape(-1)
                elif fmt == "4d":
                    pool[phys, :, off] = s[t]
                else:
                    pool[phys, :, :, off, :] = s[t].reshape(n, d // 16, 16)
        pools.append(pool)
    return pools, table


def pad_stack(seqs, length):
    """(L_b, N, D) tensors -> (B, length, N, D), NaN beyond each sequence."""
    out = torch.full((len(seqs), length) + tuple(seqs[0].shape[1:]), float("nan"), dtype=seqs[0].dtype)
    for b, s in enumerate(seqs):
        out[b, : s.shape[0]] = s
    return out


# ------------------------------------------------------------------------------ main property test


@st.composite
def cases(draw):
    layout = draw(st.sampled_from(["TND", "BSND"]))
    batch = draw(st.integers(1, 8))
    q_lens = draw(st.lists(st.integers(1, 12), min_size=batch, max_size=batch))
    prefixes = draw(st.lists(st.integers(0, 40), min_size=batch, max_size=batch))
    mla = draw(st.booleans())
    sparse = draw(st.sampled_from([0, 3]))
    if layout == "BSND" and sparse == 3 and not mla and max(q_lens) == 1:
        q_lens[0] = 2  # Q_S = 1 without rope ignores sparse_mode (ambiguous): keep Q_S > 1
    paged = draw(st.booleans())
    fmts = ["3d"] if layout == "BSND" else ["3d", "4d", "nz"]
    return dict(
        layout=layout,
        q_lens=q_lens,
        prefixes=prefixes,
        nkv=draw(st.sampled_from([1, 2])),
        ratio=draw(st.sampled_from([1, 2, 4, 8])),
        d=128 if mla else draw(st.sampled_from([64, 128])),
        mla=mla,
        value_is_key=mla and draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        sparse=sparse,
        paged=paged,
        fmt=draw(st.sampled_from(fmts)),
        block_size=draw(st.sampled_from([16, 128])),
        scale_factor=draw(st.sampled_from([1.0, 0.5, 2.0])),
        lse_flag=draw(st.booleans()),
        broadcast=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(**SETTINGS)
@given(cases())
def test_matches_sdpa(c):
    gen = torch.Generator().manual_seed(c["seed"])
    nkv, nq, d, dr = c["nkv"], c["nkv"] * c["ratio"], c["d"], 64 if c["mla"] else 0
    dtype, batch = c["dtype"], len(c["q_lens"])
    kv_lens = [p + n for p, n in zip(c["prefixes"], c["q_lens"])]

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    qs = [rnd(n, nq, d) for n in c["q_lens"]]
    ks = [rnd(n, nkv, d) for n in kv_lens]
    vs = ks if c["value_is_key"] else [rnd(n, nkv, d) for n in kv_lens]
    qrs = [rnd(n, nq, dr) for n in c["q_lens"]] if c["mla"] else None
    krs = [rnd(n, nkv, dr) for n in kv_lens] if c["mla"] else None
    scale = c["scale_factor"] / math.sqrt(d + dr)

    kw = dict(num_heads=nq, num_key_value_heads=nkv, scale=scale, input_layout=c["layout"],
              softmax_lse_flag=c["lse_flag"], sparse_mode=c["sparse"])
    if c["sparse"] == 3:
        kw["atten_mask"] = TEMPLATE
        kw["next_tokens"] = 0  # ignored with sparse_mode 3 (SGLang passes it)
    if c["layout"] == "TND":
        query = torch.cat(qs)
        kw["actual_seq_lengths"] = np.cumsum(c["q_lens"]).tolist()
        if c["mla"]:
            kw["query_rope"] = torch.cat(qrs)
    else:
        s = max(c["q_lens"])
        query = pad_stack(qs, s)
        same_q = len(set(c["q_lens"])) == 1
        kw["actual_seq_lengths"] = ([s] if c["broadcast"] else None) if same_q else list(c["q_lens"])
        if c["mla"]:
            kw["query_rope"] = pad_stack(qrs, s)
    if c["paged"]:
        families = [ks] + ([] if c["value_is_key"] else [vs]) + ([krs] if c["mla"] else [])
        pools, table = page(families, c["block_size"], c["fmt"], gen)
        key = pools[0]
        value = key if c["value_is_key"] else pools[1]
        if c["mla"]:
            kw["key_rope"] = pools[-1]
        kw.update(block_table=table, block_size=c["block_size"], actual_seq_lengths_kv=list(kv_lens))
    elif c["layout"] == "TND":
        key, value = torch.cat(ks), torch.cat(vs)
        kw["actual_seq_lengths_kv"] = np.cumsum(kv_lens).tolist()  # cumulative when not paged
        if c["mla"]:
            kw["key_rope"] = torch.cat(krs)
    else:
        skv = max(kv_lens)
        key, value = pad_stack(ks, skv), pad_stack(vs, skv)
        same_kv = len(set(kv_lens)) == 1
        kw["actual_seq_lengths_kv"] = ([skv] if c["broadcast"] else None) if same_kv else list(kv_lens)
        if c["mla"]:
            kw["key_rope"] = pad_stack(krs, skv)

    out, lse = FIA(query, key, value, **kw)

    assert out.dtype == dtype
    assert out.shape == query.shape[:-1] + (d,)
    if c["lse_flag"]:
        assert lse.dtype == torch.float32
        assert lse.shape == ((query.shape[0], nq, 1) if c["layout"] == "TND" else (batch, nq, query.shape[1], 1))
    else:
        assert lse.shape == (1,) and lse.item() == 0
    tol = tolerances(dtype)
    start = 0
    for b in range(batch):
        sq, skv = c["q_lens"][b], kv_lens[b]
        allowed = bottom_right_causal(sq, skv) if c["sparse"] == 3 else None
        ref, ref_lse = oracle(qs[b], ks[b], vs[b], scale, allowed,
                              qrs[b] if c["mla"] else None, krs[b] if c["mla"] else None)
        got = out[start : start + sq] if c["layout"] == "TND" else out[b, :sq]
        torch.testing.assert_close(got.float(), ref, **tol)
        if c["lse_flag"]:
            got_lse = lse[start : start + sq, :, 0] if c["layout"] == "TND" else lse[b, :, :sq, 0].transpose(0, 1)
            torch.testing.assert_close(got_lse, ref_lse, atol=1e-4, rtol=1e-4)
        start += sq


# ------------------------------------------------------------------------------ BSH / BNSD / BSND, element-wise masks


def to_layout(x, layout):
    """(B, S, N, D) -> the layout's tensor."""
    if layout == "BSH":
        return x.reshape(x.shape[0], x.shape[1], -1)
    if layout == "BNSD":
        return x.transpose(1, 2).contiguous()
    return x


def from_layout(x, layout, n):
    if layout == "BSH":
        return x.reshape(x.shape[0], x.shape[1], n, -1)
    if layout == "BNSD":
        return x.transpose(1, 2)
    return x


@settings(**SETTINGS)
@given(
    layout=st.sampled_from(["BSH", "BNSD", "BSND"]),
    batch=st.integers(1, 5),
    s=st.integers(1, 9),
    extra_kv=st.integers(0, 20),
    nkv=st.sampled_from([1, 2]),
    ratio=st.sampled_from([1, 2, 4, 8]),
    d=st.sampled_from([64, 128]),
    paged=st.booleans(),
    mask_mode=st.sampled_from(["none", "mode0", "mode0_band", "mode1_band_ignored"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    data=st.data(),
)
def test_bs_layouts_and_elementwise_masks(layout, batch, s, extra_kv, nkv, ratio, d, paged, mask_mode, dtype, data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    nq = nkv * ratio
    q_lens = [data.draw(st.integers(1, s)) for _ in range(batch)] if s > 1 else [1] * batch
    kv_lens = [data.draw(st.integers(s, s + extra_kv)) for _ in range(batch)]  # Skv >= S
    block_size = 16
    qs = [torch.randn(n, nq, d, generator=gen).to(dtype) for n in q_lens]
    ks = [torch.randn(n, nkv, d, generator=gen).to(dtype) for n in kv_lens]
    vs = [torch.randn(n, nkv, d, generator=gen).to(dtype) for n in kv_lens]
    scale = 1 / math.sqrt(d)
    query = to_layout(pad_stack(qs, s), layout)
    kw = dict(num_heads=nq, num_key_value_heads=nkv, scale=scale, input_layout=layout, softmax_lse_flag=True,
              actual_seq_lengths=q_lens, actual_seq_lengths_kv=kv_lens)
    if paged:
        (key, value), table = page([ks, vs], block_size, "3d", gen)
        kw.update(block_table=table, block_size=block_size)
        kv_cap = table.shape[1] * block_size
    else:
        kv_cap = max(kv_lens)
        key, value = to_layout(pad_stack(ks, kv_cap), layout), to_layout(pad_stack(vs, kv_cap), layout)

    pre = nxt = 2147483647
    masks = [None] * batch
    if mask_mode != "none":
        m = torch.rand(batch, 1, s, kv_cap, generator=gen) < 0.4  # True = masked
        for i in range(s):
            m[:, 0, i, i] = False  # the diagonal stays visible: no fully masked rows
        if mask_mode != "none" and s > 1:
            pre, nxt = data.draw(st.integers(0, 4)), data.draw(st.integers(0, 4))
        if s == 1:
            kw["atten_mask"] = m[:, 0, 0, :]  # (B, KV_S), the documented Q_S = 1 form
        else:
            kw["atten_mask"] = m.to(data.draw(st.sampled_from([torch.bool, torch.int8, torch.uint8])))
        kw["sparse_mode"] = 1 if mask_mode == "mode1_band_ignored" else 0
        if mask_mode != "mode0":
            kw.update(pre_tokens=pre, next_tokens=nxt)
        for b in range(batch):
            allowed = ~m[b, 0, : q_lens[b], : kv_lens[b]]
            if mask_mode == "mode0_band" and s > 1:
                ones = torch.ones(q_lens[b], kv_lens[b], dtype=torch.bool)
                allowed = allowed & ones.tril(diagonal=nxt) & ones.triu(diagonal=-pre)
            masks[b] = allowed

    out, lse = FIA(query, key, value, **kw)
    out = from_layout(out, layout, nq)
    assert lse.shape == (batch, nq, s, 1)
    for b in range(batch):
        ref, ref_lse = oracle(qs[b], ks[b], vs[b], scale, masks[b])
        torch.testing.assert_close(out[b, : q_lens[b]].float(), ref, **tolerances(dtype))
        torch.testing.assert_close(lse[b, :, : q_lens[b], 0].transpose(0, 1), ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("paged", [False, True])
def test_layouts_agree_with_oracle(paged):
    """BSH, BNSD and BSND carry the same numbers in different arrangements (S, N > 1)."""
    gen = torch.Generator().manual_seed(21)
    b, s, nq, nkv, d, skv = 2, 5, 4, 2, 64, 11
    q4 = torch.randn(b, s, nq, d, generator=gen)
    k4 = torch.randn(b, skv, nkv, d, generator=gen)
    v4 = torch.randn(b, skv, nkv, d, generator=gen)
    kw = dict(num_heads=nq, num_key_value_heads=nkv, scale=0.125, atten_mask=TEMPLATE, sparse_mode=3,
              actual_seq_lengths_kv=[skv, 7])
    for layout in ("BSH", "BNSD", "BSND"):
        if paged:
            (key, value), table = page([list(k4), list(v4)], 16, "3d", gen)
            extra = dict(block_table=table, block_size=16)
        else:
            key, value, extra = to_layout(k4, layout), to_layout(v4, layout), {}
        out, lse = FIA(to_layout(q4, layout), key, value, input_layout=layout, softmax_lse_flag=True, **kw, **extra)
        assert out.shape == to_layout(q4, layout).shape and lse.shape == (b, nq, s, 1)
        out = from_layout(out, layout, nq)
        for i, n in enumerate([skv, 7]):
            ref, ref_lse = oracle(q4[i], k4[i, :n], v4[i, :n], 0.125, bottom_right_causal(s, n))
            torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(lse[i, :, :, 0].transpose(0, 1), ref_lse, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------ sparse modes 2 and 4


@pytest.mark.parametrize("mode", [2, 3, 4])
@pytest.mark.parametrize("layout", ["BSND", "TND"])
def test_template_sparse_modes(mode, layout):
    gen = torch.Generator().manual_seed(mode * 10 + len(layout))
    q_lens, kv_lens, nq, nkv, d = [5, 3, 7], [9, 3, 12], 4, 2, 64
    pre, nxt = 3, 1
    qs = [torch.randn(n, nq, d, generator=gen) for n in q_lens]
    ks = [torch.randn(n, nkv, d, generator=gen) for n in kv_lens]
    vs = [torch.randn(n, nkv, d, generator=gen) for n in kv_lens]
    (key, value), table = page([ks, vs], 16, "3d", gen)
    kw = dict(num_heads=nq, num_key_value_heads=nkv, scale=0.125, atten_mask=TEMPLATE, sparse_mode=mode,
              pre_tokens=pre, next_tokens=nxt, block_table=table, block_size=16, input_layout=layout,
              actual_seq_lengths_kv=kv_lens)
    if layout == "TND":
        out, _ = FIA(torch.cat(qs), key, value, actual_seq_lengths=np.cumsum(q_lens).tolist(), **kw)
        outs = torch.split(out, q_lens)
    else:
        out, _ = FIA(pad_stack(qs, max(q_lens)), key, value, actual_seq_lengths=q_lens, **kw)
        outs = [out[b, :n] for b, n in enumerate(q_lens)]
    for b, (sq, skv) in enumerate(zip(q_lens, kv_lens)):
        ones = torch.ones(sq, skv, dtype=torch.bool)
        if mode == 2:
            allowed = ones.tril(diagonal=0)
        elif mode == 3:
            allowed = ones.tril(diagonal=skv - sq)
        else:  # band around the bottom-right diagonal
            allowed = ones.tril(diagonal=skv - sq + nxt) & ones.triu(diagonal=skv - sq - pre)
        torch.testing.assert_close(outs[b], oracle(qs[b], ks[b], vs[b], 0.125, allowed)[0], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------ the checks can fail


def test_wrong_conventions_are_detected():
    """The oracle distinguishes bottom-right from top-left causal alignment, the grouped GQA
    mapping from a modulo one, and cumulative from per-sequence kv lengths."""
    gen = torch.Generator().manual_seed(7)
    sq, skv, nq, nkv, d = 4, 10, 4, 2, 64
    q = torch.randn(sq, nq, d, generator=gen)
    k = torch.randn(skv, nkv, d, generator=gen)
    v = torch.randn(skv, nkv, d, generator=gen)
    out, _ = FIA(q, k, v, num_heads=nq, num_key_value_heads=nkv, scale=0.125, input_layout="TND",
                 actual_seq_lengths=[sq], actual_seq_lengths_kv=[skv], atten_mask=TEMPLATE, sparse_mode=3)
    right = oracle(q, k, v, 0.125, bottom_right_causal(sq, skv))[0]
    torch.testing.assert_close(out, right, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out, oracle(q, k, v, 0.125, top_left_causal(sq, skv))[0], atol=1e-3)
    # a modulo head mapping (q head h -> kv head h % Nkv) gives other numbers
    k_mod, v_mod = k[:, [0, 1, 0, 1]], v[:, [0, 1, 0, 1]]
    wrong = oracle(q, k_mod, v_mod, 0.125, bottom_right_causal(sq, skv))[0]
    assert not torch.allclose(out, wrong, atol=1e-3)
    # per-sequence kv lengths where cumulative ones are due (non-paged TND) are rejected
    with pytest.raises(ValueError, match="cumulative"):
        FIA(torch.cat([q, q]), torch.cat([k, k]), torch.cat([v, v]), num_heads=nq, num_key_value_heads=nkv,
            input_layout="TND", actual_seq_lengths=[sq, 2 * sq], actual_seq_lengths_kv=[skv, skv])


def test_paged_reads_only_the_table_blocks():
    """Poison every block that the table does not name: the output stays finite and exact."""
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(40, 2, 64, generator=gen)
    v = torch.randn(40, 2, 64, generator=gen)
    q = torch.randn(1, 1, 4 * 64, generator=gen)
    (kp, vp), table = page([[k], [v]], 16, "3d", gen, spare=5)
    out, _ = FIA(q, kp, vp, num_heads=4, num_key_value_heads=2, scale=0.125, block_table=table, block_size=16,
                 actual_seq_lengths_kv=[40])
    torch.testing.assert_close(out.view(1, 4, 64), oracle(q.view(1, 4, 64), k, v, 0.125)[0], atol=1e-5, rtol=1e-4)
    assert torch.isfinite(out).all()
    # swapping a full block with the partly filled last one (40 = 16 + 16 + 8) changes the result
    bad = table.clone()
    bad[0, 1:3] = table[0, 1:3].flip(0)
    out_bad, _ = FIA(q, kp, vp, num_heads=4, num_key_value_heads=2, scale=0.125, block_table=bad, block_size=16,
                     actual_seq_lengths_kv=[40])
    assert not torch.allclose(out_bad, out, atol=1e-3)


# ------------------------------------------------------------------------------ edge cases


def test_empty_kv_gives_zeros():
    q = torch.randn(2, 3, 4, 64)
    k = torch.randn(2, 5, 2, 64)
    v = torch.randn(2, 5, 2, 64)
    out, _ = FIA(q, k, v, num_heads=4, num_key_value_heads=2, input_layout="BSND", scale=0.1,
                 actual_seq_lengths_kv=[0, 5])
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out[1], oracle(q[1], k[1], v[1], 0.1)[0], atol=1e-5, rtol=1e-4)
    out, _ = FIA(q, k[:, :0], v[:, :0], num_heads=4, num_key_value_heads=2, input_layout="BSND")
    assert torch.equal(out, torch.zeros_like(out))


def test_decode_query_lengths_ignored_and_mode0_template_row():
    """Q_S = 1 (not TND): actual_seq_lengths has no effect [DOC]; SGLang 0.5.11's len-1 call
    (sparse_mode 0, 2048 template, one key) sees its single key."""
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(3, 1, 2, 64, generator=gen)
    k = torch.randn(3, 6, 2, 64, generator=gen)
    v = torch.randn(3, 6, 2, 64, generator=gen)
    a, _ = FIA(q, k, v, num_heads=2, input_layout="BSND", actual_seq_lengths=[0])
    b, _ = FIA(q, k, v, num_heads=2, input_layout="BSND")
    assert torch.equal(a, b)
    c, _ = FIA(q, k[:, :1], v[:, :1], num_heads=2, input_layout="BSND", atten_mask=TEMPLATE[None], sparse_mode=0)
    torch.testing.assert_close(c, v[:, :1].expand_as(c), atol=1e-6, rtol=0)


def test_fully_masked_rows():
    q = torch.randn(1, 2, 1, 64)
    k = torch.randn(1, 3, 1, 64)
    v = torch.randn(1, 3, 1, 64)
    m = torch.zeros(1, 2, 3, dtype=torch.bool)
    m[0, 0] = True  # row 0 sees nothing
    with pytest.raises(NotImplementedError, match="fully masked"):
        FIA(q, k, v, input_layout="BSND", atten_mask=m)
    out, _ = FIA(q, k, v, input_layout="BSND", atten_mask=m, inner_precise=2)
    assert torch.equal(out[0, 0], torch.zeros_like(out[0, 0]))
    torch.testing.assert_close(out[0, 1], oracle(q[0, 1:], k[0], v[0], 1.0)[0][0], atol=1e-5, rtol=1e-4)
    # sparse_mode 3 with Q_S > KV_S: the invalid-row fix is automatic [DOC]
    q4 = torch.randn(4, 1, 64)
    out, _ = FIA(q4, k[0], v[0], input_layout="TND", actual_seq_lengths=[4], actual_seq_lengths_kv=[3],
                 atten_mask=TEMPLATE, sparse_mode=3)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out[1:], oracle(q4[1:], k[0], v[0], 1.0, bottom_right_causal(3, 3))[0],
                               atol=1e-5, rtol=1e-4)


def test_nz_and_4d_pools_match_3d():
    gen = torch.Generator().manual_seed(5)
    q_lens, kv_lens = [2, 3], [20, 9]
    qs = [torch.randn(n, 8, 128, generator=gen) for n in q_lens]
    ks = [torch.randn(n, 1, 128, generator=gen) for n in kv_lens]
    results = []
    for fmt in ("3d", "4d", "nz"):
        (pool,), table = page([ks], 16, fmt, torch.Generator().manual_seed(9))
        out, _ = FIA(torch.cat(qs), pool, pool, num_heads=8, num_key_value_heads=1, input_layout="TND",
                     block_table=table, block_size=16, actual_seq_lengths=[2, 5], actual_seq_lengths_kv=kv_lens,
                     atten_mask=TEMPLATE, sparse_mode=3, scale=0.08)
        results.append(out)
    for b, off in enumerate([0, 2]):
        ref = oracle(qs[b], ks[b], ks[b], 0.08, bottom_right_causal(q_lens[b], kv_lens[b]))[0]
        for out in results:
            torch.testing.assert_close(out[off : off + q_lens[b]], ref, atol=1e-5, rtol=1e-4)


def test_out_variant_and_workspace():
    gen = torch.Generator().manual_seed(2)
    ks = [torch.randn(n, 2, 64, generator=gen).bfloat16() for n in (7, 30)]
    (kp, vp), table = page([ks, ks], 16, "3d", gen)
    q = torch.randn(2, 1, 4 * 64, generator=gen).bfloat16()
    kw = dict(num_heads=4, num_key_value_heads=2, scale=0.125, input_layout="BSH", block_table=table,
              block_size=16, actual_seq_lengths_kv=[7, 30])
    ws = fia.get_max_workspace(q, kp, vp, **kw)
    assert isinstance(ws, torch.Tensor)
    out_buf = torch.empty_like(q)
    lse_buf = torch.full((1,), 5.0, dtype=q.dtype)  # SGLang: torch.empty(1, dtype=q.dtype)
    fia.npu_fused_infer_attention_score_out(q, kp, vp, workspace=ws, out=[out_buf, lse_buf], **kw)
    ref, _ = FIA(q, kp, vp, **kw)
    assert torch.equal(out_buf, ref) and lse_buf.item() == 0
    for b in range(2):
        torch.testing.assert_close(out_buf[b].view(1, 4, 64).float(),
                                   oracle(q[b].view(1, 4, 64), ks[b], ks[b], 0.125)[0], **tolerances(torch.bfloat16))
    with pytest.raises(ValueError):
        fia.get_max_workspace(q, kp, vp, **{**kw, "actual_seq_lengths_kv": None})


# ------------------------------------------------------------------------------ argument types are recorded


def test_length_types_are_recorded():
    q = torch.randn(5, 2, 64)
    k = torch.randn(8, 2, 64)
    base = dict(num_heads=2, input_layout="TND")
    ref, _ = FIA(q, k, k, actual_seq_lengths=[2, 5], actual_seq_lengths_kv=[3, 8], **base)
    variants = [
        ([2, 5], "list[int]", True),
        ((2, 5), "tuple[int]", False),
        (np.cumsum([2, 3]), f"numpy.ndarray[{np.cumsum([2, 3]).dtype}]", False),
        ([np.int64(2), np.int64(5)], "list[numpy.int64]", False),
        (torch.tensor([2, 5], dtype=torch.int32), "torch.Tensor[int32]", False),
    ]
    fia.reset_call_log()
    for value, desc, plain in variants:
        out, _ = FIA(q, k, k, actual_seq_lengths=value, actual_seq_lengths_kv=[3, 8], **base)
        assert torch.equal(out, ref)
        assert fia.last_call_arg_types["actual_seq_lengths"] == desc
        assert fia.last_call_arg_types["actual_seq_lengths_kv"] == "list[int]"
        entry = fia.call_log[-1]
        assert entry["python_int_list"] == {"actual_seq_lengths": plain, "actual_seq_lengths_kv": True}
        assert entry["values"]["actual_seq_lengths"] == [2, 5]
        assert entry["input_layout"] == "TND"
    assert len(fia.call_log) == len(variants)
    # strict mode: only lists/tuples of Python ints get through
    fia.strict_length_types = True
    try:
        FIA(q, k, k, actual_seq_lengths=(2, 5), actual_seq_lengths_kv=[3, 8], **base)
        with pytest.raises(TypeError, match="Python ints"):
            FIA(q, k, k, actual_seq_lengths=np.array([2, 5]), actual_seq_lengths_kv=[3, 8], **base)
    finally:
        fia.strict_length_types = False
    # a failing call is still recorded
    with pytest.raises(ValueError):
        FIA(q, k, k, actual_seq_lengths=np.array([5, 2]), actual_seq_lengths_kv=[3, 8], **base)
    assert fia.last_call_arg_types["actual_seq_lengths"].startswith("numpy.ndarray")


# ------------------------------------------------------------------------------ wrong inputs raise


def _bad_cases():
    q = torch.randn(5, 4, 64)
    k = torch.randn(8, 2, 64)
    tnd = dict(num_heads=4, num_key_value_heads=2, input_layout="TND", actual_seq_lengths=[2, 5],
               actual_seq_lengths_kv=[3, 8])
    qb = torch.randn(2, 3, 4, 64)
    kb = torch.randn(2, 6, 2, 64)
    bsnd = dict(num_heads=4, num_key_value_heads=2, input_layout="BSND")
    pool = torch.randn(6, 16, 2 * 64)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    paged = dict(bsnd, block_table=table, block_size=16, actual_seq_lengths_kv=[20, 5])
    bq3 = (torch.randn(3, 3, 4, 64), torch.randn(3, 6, 2, 64), torch.randn(3, 6, 2, 64))
    pool4 = torch.randn(6, 2, 16, 64)
    mla_q, mla_k = torch.randn(5, 4, 128), torch.randn(8, 2, 128)
    small_mask = torch.zeros(3, 5, dtype=torch.bool)
    return [
        # (id, exception, message fragment, args, kwargs)
        ("TND without q lengths", ValueError, "requires actual_seq_lengths", (q, k, k), {**tnd, "actual_seq_lengths": None}),
        ("TND without kv lengths", ValueError, "requires actual_seq_lengths_kv", (q, k, k),
         {**tnd, "actual_seq_lengths_kv": None}),
        ("non-monotonic cumulative", ValueError, "non-decreasing", (q, k, k), {**tnd, "actual_seq_lengths": [3, 2]}),
        ("cumulative does not cover T", ValueError, "number of tokens", (q, k, k), {**tnd, "actual_seq_lengths": [2, 4]}),
        ("negative length", ValueError, "negative", (q, k, k), {**tnd, "actual_seq_lengths": [-1, 5]}),
        ("q/kv batch differ", ValueError, "one per batch", (q, k, k), {**tnd, "actual_seq_lengths_kv": [8]}),
        ("GQA ratio not integral", ValueError, "not a multiple", (torch.randn(5, 6, 64), torch.randn(8, 4, 64),
                                                                  torch.randn(8, 4, 64)),
         {**tnd, "num_heads": 6, "num_key_value_heads": 4}),
        ("num_heads != query N", ValueError, "num_heads=8", (q, k, k), {**tnd, "num_heads": 8}),
        ("kv heads != key N", ValueError, "num_key_value_heads=1", (q, k, k), {**tnd, "num_key_value_heads": 1}),
        ("head dims differ", ValueError, "key D=32", (q, torch.randn(8, 2, 32), torch.randn(8, 2, 32)), tnd),
        ("dtype mismatch", ValueError, "must equal query dtype", (q, k.bfloat16(), k.bfloat16()), tnd),
        ("float lengths", TypeError, "not an integer", (q, k, k), {**tnd, "actual_seq_lengths": [2.0, 5.0]}),
        ("sparse 3 without mask", ValueError, "requires atten_mask", (q, k, k), {**tnd, "sparse_mode": 3}),
        ("sparse 3 small mask", ValueError, "template", (q, k, k),
         {**tnd, "sparse_mode": 3, "atten_mask": TEMPLATE[:1024, :1024]}),
        ("sparse 3 wrong template", ValueError, "not the lower-triangular", (q, k, k),
         {**tnd, "sparse_mode": 3, "atten_mask": ~TEMPLATE}),
        ("sparse 3 float mask", ValueError, "bool/int8/uint8", (q, k, k),
         {**tnd, "sparse_mode": 3, "atten_mask": TEMPLATE.float()}),
        ("sparse 5", ValueError, "not supported", (q, k, k), {**tnd, "sparse_mode": 5, "atten_mask": TEMPLATE}),
        ("TND element-wise mask", ValueError, "element-wise", (q, k, k),
         {**tnd, "atten_mask": torch.zeros(5, 8, dtype=torch.bool)}),
        ("query_rope alone", ValueError, "together", (q, k, k), {**tnd, "query_rope": torch.randn(5, 4, 64)}),
        ("rope dim not 64", ValueError, "must be 64", (mla_q, mla_k, mla_k),
         {**tnd, "query_rope": torch.randn(5, 4, 32), "key_rope": torch.randn(8, 2, 32)}),
        ("unknown layout", ValueError, "unknown input_layout", (q, k, k), {**tnd, "input_layout": "SBH"}),
        ("unknown kwarg", TypeError, "bogus", (q, k, k), {**tnd, "bogus": 1}),
        ("pse_shift", NotImplementedError, "pse_shift", (q, k, k), {**tnd, "pse_shift": torch.zeros(1)}),
        ("BSND lengths 2 for batch 3", ValueError, "must be 1 or >= batch", bq3, {**bsnd, "actual_seq_lengths": [1, 2]}),
        ("BSND length > S", ValueError, "outside", (qb, kb, kb), {**bsnd, "actual_seq_lengths": [4]}),
        ("BSND kv length > Skv", ValueError, "outside", (qb, kb, kb), {**bsnd, "actual_seq_lengths_kv": [7, 1]}),
        ("key batch differs", ValueError, "key batch", (qb, kb[:1], kb[:1]), bsnd),
        ("paged without kv lengths", ValueError, "requires actual_seq_lengths_kv", (qb, pool, pool),
         {**paged, "actual_seq_lengths_kv": None}),
        ("paged kv length > capacity", ValueError, "outside", (qb, pool, pool), {**paged, "actual_seq_lengths_kv": [33, 5]}),
        ("block_table int64", ValueError, "int32", (qb, pool, pool), {**paged, "block_table": table.long()}),
        ("block id outside pool", ValueError, "outside the pool", (qb, pool, pool), {**paged, "block_table": table + 5}),
        ("too few table rows", ValueError, "rows for batch", (qb, pool, pool), {**paged, "block_table": table[:1]}),
        ("block_size != pool", ValueError, "block_size", (qb, pool, pool), {**paged, "block_size": 32}),
        ("4-D pool with BSND", ValueError, "must be \\(blocknum, blocksize, H\\)", (qb, pool4, pool4), paged),
        ("Q_S=1 with template and sparse 3", NotImplementedError, "ambiguous", (qb[:, :1], kb, kb),
         {**bsnd, "atten_mask": TEMPLATE, "sparse_mode": 3}),
        ("mask smaller than Q_S x KV_S", ValueError, "smaller than", (qb, kb, kb), {**bsnd, "atten_mask": small_mask}),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_wrong_inputs_raise(case):
    _, exc, match, args, kwargs = case
    with pytest.raises(exc, match=match):
        FIA(*args, **kwargs)


def test_good_variants_of_bad_cases_pass():
    """The wrong-input cases fail because of the named defect, not something else."""
    q = torch.randn(5, 4, 64)
    k = torch.randn(8, 2, 64)
    FIA(q, k, k, num_heads=4, num_key_value_heads=2, input_layout="TND", actual_seq_lengths=[2, 5],
        actual_seq_lengths_kv=[3, 8], sparse_mode=3, atten_mask=TEMPLATE)
    qb = torch.randn(2, 3, 4, 64)
    pool = torch.randn(6, 16, 2 * 64)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    FIA(qb, pool, pool, num_heads=4, num_key_value_heads=2, input_layout="BSND", block_table=table, block_size=16,
        actual_seq_lengths_kv=[20, 5])
    FIA(qb[:, :1], pool, pool, num_heads=4, num_key_value_heads=2, input_layout="BSND", block_table=table,
        block_size=16, actual_seq_lengths_kv=[1, 1], atten_mask=TEMPLATE, sparse_mode=3)
