"""The causal-conv1d update models (sgl_accel.testing.kernels.conv1d) against an
independent oracle: the convolution written out element by element below (python
floats, fp64), sharing no code with the kernels.

The AscendC model must match the oracle where npu-ops.md 2.2 says the real op is
right (W=4, D in {3, 4}) and show exactly the deviations recorded there elsewhere.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sgl_accel.testing.kernels import conv1d
from sgl_accel.testing.kernels.conv1d import (
    _round_half_away,
    causal_conv1d_update_ascendc,
    causal_conv1d_update_reference,
    causal_conv1d_update_v2,
)

SETTINGS = dict(max_examples=25, deadline=None)


# ----------------------------------------------------------------------------------
# Oracle
# ----------------------------------------------------------------------------------


def oracle(x, lines, weight, bias, silu, starts):
    """Per element: history of item b = lines[b, starts[b] : starts[b] + W - 1];
    seq = history ++ x[b]; y[b, t, c] = act(bias[c] + sum_j w[j, c] * seq[t + j, c]).
    New line = the last state_len rows of seq (all of seq if shorter; plain values).
    Returns (y fp64 [B, S, dim], magnitude sum_j |w * seq| [B, S, dim], new lines list)."""
    xs, ls, ws = x.double().tolist(), lines.double().tolist(), weight.double().tolist()
    bs = bias.double().tolist() if bias is not None else None
    batch, seqlen, dim = x.shape
    width = weight.shape[0]
    state_len = lines.shape[1]
    y = [[[0.0] * dim for _ in range(seqlen)] for _ in range(batch)]
    mag = [[[0.0] * dim for _ in range(seqlen)] for _ in range(batch)]
    new_lines = []
    for b in range(batch):
        seq = [ls[b][starts[b] + k] for k in range(width - 1)] + [xs[b][t] for t in range(seqlen)]
        for t in range(seqlen):
            for c in range(dim):
                acc = bs[c] if bs is not None else 0.0
                m = abs(acc)
                for j in range(width):
                    acc += ws[j][c] * seq[t + j][c]
                    m += abs(ws[j][c] * seq[t + j][c])
                if silu:
                    acc = acc / (1.0 + math.exp(-acc)) if acc > -700 else 0.0
                y[b][t][c] = acc
                mag[b][t][c] = m
        new_lines.append(seq[max(0, len(seq) - state_len) :])
    return torch.tensor(y, dtype=torch.float64), torch.tensor(mag, dtype=torch.float64), new_lines


REL = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-20}


def close(y, want, mag, dtype):
    """Elementwise |y - want| <= half an output ulp + fp32 accumulation slack."""
    err = (y.double() - want).abs()
    tol = REL[dtype] * want.abs() + 1e-5 * (mag + 1e-3)
    return bool((err <= tol).all())


def assert_close(y, want, mag, dtype):
    err = (y.double() - want).abs()
    tol = REL[dtype] * want.abs() + 1e-5 * (mag + 1e-3)
    assert bool((err <= tol).all()), f"max excess {float((err - tol).max())}"


def make_case(seed, batch, seqlen, dim, width, state_len, dtype, n_lines=None, with_bias=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    n_lines = n_lines or batch + 3
    x = (torch.randn(batch, seqlen, dim, generator=g) * scale).to(dtype)
    weight = (torch.randn(width, dim, generator=g) / width).to(dtype)
    bias = (torch.randn(dim, generator=g) * 0.1).to(dtype) if with_bias else None
    state = (torch.randn(n_lines, state_len, dim, generator=g) * scale).to(dtype)
    return g, x, weight, bias, state


def draw_indices(g, batch, n_lines, n_pad):
    """Distinct real lines from 1..n_lines-1 (line 0 is the dummy), n_pad entries -1."""
    perm = (torch.randperm(n_lines - 1, generator=g) + 1)[:batch].tolist()
    pads = torch.randperm(batch, generator=g)[:n_pad].tolist()
    for p in pads:
        perm[p] = -1
    return torch.tensor(perm, dtype=torch.int32)


# ----------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------


@settings(**SETTINGS)
@given(
    seed=st.integers(0, 2**31 - 1),
    width=st.sampled_from([2, 3, 4]),
    seqlen=st.integers(1, 5),
    batch=st.integers(1, 8),
    dim=st.sampled_from([1, 4, 8]),
    extra=st.integers(0, 4),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    with_bias=st.booleans(),
    silu=st.booleans(),
)
def test_reference_matches_oracle(seed, width, seqlen, batch, dim, extra, dtype, with_bias, silu):
    state_len = width - 1 + extra
    _, x, w, b, lines = make_case(seed, batch, seqlen, dim, width, state_len, dtype, n_lines=batch, with_bias=with_bias)
    before = lines.clone()
    y, new = causal_conv1d_update_reference(x, lines, w, b, "silu" if silu else None)
    want, mag, want_lines = oracle(x, lines, w, b, silu, [state_len - (width - 1)] * batch)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, want, mag, dtype)
    # Whole line = cat(line, x)[-state_len:]: written out here from the definition.
    cat = torch.cat([lines, x], dim=1)
    assert torch.equal(new, cat[:, cat.shape[1] - state_len :])
    if state_len <= width - 1 + seqlen:  # the oracle's line is defined when L <= W-1+S
        assert torch.equal(new, torch.tensor(want_lines, dtype=torch.float64).to(dtype))
    assert torch.equal(lines, before)  # pure function


# ----------------------------------------------------------------------------------
# Triton v2 model
# ----------------------------------------------------------------------------------


@settings(**SETTINGS)
@given(
    seed=st.integers(0, 2**31 - 1),
    width=st.sampled_from([2, 3, 4, 5, 6]),
    draft=st.integers(1, 5),
    batch=st.integers(1, 8),
    dim=st.sampled_from([1, 4, 8, 16]),
    dtype=st.sampled_from([torch.float16, torch.float32, torch.bfloat16]),
    n_pad=st.integers(0, 3),
    with_bias=st.booleans(),
    silu=st.booleans(),
)
def test_v2_sglang_verify_matches_oracle(seed, width, draft, batch, dim, dtype, n_pad, with_bias, silu):
    """SGLang's call: x [B, D, dim], state_len = W-2+D, num_accepted = D, pads -1."""
    state_len = width - 2 + draft
    n_lines = batch + 4
    g, x, w, b, state = make_case(seed, batch, draft, dim, width, state_len, dtype, n_lines, with_bias)
    if dtype == torch.float32:
        # The kernel multiplies fp16 copies of its operands: keep fp32 data fp16-exact
        # here (the rounding itself is tested separately).
        x, state = x.half().float(), state.half().float()
    n_pad = min(n_pad, batch)
    idx = draw_indices(g, batch, n_lines, n_pad)
    x_in, before = x.clone(), state.clone()
    out = causal_conv1d_update_v2(
        x, state, w, b, "silu" if silu else None, conv_state_indices=idx,
        num_accepted_tokens=torch.full((batch,), draft, dtype=torch.int32), pad_slot_id=-1,
    )
    active = [i for i in range(batch) if idx[i] >= 0]
    lines_used = before[idx.long().clamp_min(0)]
    want, mag, want_lines = oracle(x_in, lines_used, w, b, silu, [draft - 1] * batch)
    assert out is x  # results written into x's storage, same dtype -> same tensor
    for i in range(batch):
        if i in active:
            assert_close(out[i], want[i], mag[i], dtype)
            assert torch.equal(state[idx[i]], torch.tensor(want_lines[i], dtype=torch.float64).to(dtype))
            # == the whole-line convention cat(old, x)[-state_len:]
            assert torch.equal(state[idx[i]], torch.cat([before[idx[i]], x_in[i]])[-state_len:])
        else:
            assert torch.equal(out[i], x_in[i])  # pad rows: nothing written
    touched = {int(idx[i]) for i in active}
    for line in range(n_lines):
        if line not in touched:
            assert torch.equal(state[line], before[line]), f"line {line} changed"


@settings(**SETTINGS)
@given(
    seed=st.integers(0, 2**31 - 1),
    width=st.sampled_from([2, 3, 4]),
    draft=st.integers(1, 5),
    batch=st.integers(1, 6),
    dtype=st.sampled_from([torch.float16, torch.float32]),
    data=st.data(),
)
def test_v2_num_accepted_window(seed, width, draft, batch, dtype, data):
    """num_accepted n <= D: history = line[n-1 : n+W-2], new line = (history ++ x)[1:]."""
    state_len = width - 2 + draft
    dim = 4
    g, x, w, b, state = make_case(seed, batch, draft, dim, width, state_len, dtype, batch + 2)
    if dtype == torch.float32:
        x, state = x.half().float(), state.half().float()
    n_acc = [data.draw(st.integers(1, draft)) for _ in range(batch)]
    idx = draw_indices(g, batch, batch + 2, 0)
    x_in, before = x.clone(), state.clone()
    out = causal_conv1d_update_v2(
        x, state, w, b, None, conv_state_indices=idx,
        num_accepted_tokens=torch.tensor(n_acc, dtype=torch.int32),
    )
    want, mag, want_lines = oracle(x_in, before[idx.long()], w, b, False, [n - 1 for n in n_acc])
    assert_close(out, want, mag, dtype)
    for i in range(batch):
        assert torch.equal(state[idx[i]], torch.tensor(want_lines[i], dtype=torch.float64).to(dtype))


@settings(**SETTINGS)
@given(
    seed=st.integers(0, 2**31 - 1),
    width=st.sampled_from([2, 3, 4]),
    seqlen=st.integers(1, 4),
    batch=st.integers(1, 6),
    extra=st.integers(0, 3),
    decode_2d=st.booleans(),
)
def test_v2_non_spec(seed, width, seqlen, batch, extra, decode_2d):
    """Without num_accepted_tokens: history = line[:W-1]; line[:W-1] = cat(line[:W-1], x)[-(W-1):],
    slots >= W-1 untouched; x may be [B, dim] (one token)."""
    if decode_2d:
        seqlen = 1
    state_len = width - 1 + extra
    g, x, w, b, state = make_case(seed, batch, seqlen, 4, width, state_len, torch.float16, batch + 2)
    idx = draw_indices(g, batch, batch + 2, 0)
    before = state.clone()
    arg = x[:, 0].clone() if decode_2d else x.clone()
    out = causal_conv1d_update_v2(arg, state, w, b, True, conv_state_indices=idx)
    want, mag, _ = oracle(x, before[idx.long()], w, b, True, [0] * batch)
    assert out.shape == arg.shape
    assert_close(out.reshape(x.shape), want, mag, torch.float16)
    for i in range(batch):
        head = torch.cat([before[idx[i], : width - 1], x[i]])[-(width - 1) :] if width > 1 else before[idx[i], :0]
        assert torch.equal(state[idx[i], : width - 1], head)
        assert torch.equal(state[idx[i], width - 1 :], before[idx[i], width - 1 :])


@settings(**SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), width=st.sampled_from([3, 4]), data=st.data())
def test_v2_varlen_spec(seed, width, data):
    """query_start_loc: item lengths 0..D (0 = skipped), state_len_run = W-2+S_b."""
    draft = 4
    lengths = data.draw(st.lists(st.integers(0, draft), min_size=1, max_size=5))
    batch = len(lengths)
    state_len = width - 2 + draft
    g = torch.Generator().manual_seed(seed)
    dim = 4
    tokens = sum(lengths)
    x = torch.randn(tokens, dim, generator=g).half()
    w = torch.randn(width, dim, generator=g).half()
    state = torch.randn(batch + 2, state_len, dim, generator=g).half()
    idx = draw_indices(g, batch, batch + 2, 0)
    n_acc = [data.draw(st.integers(1, draft)) for _ in range(batch)]
    qsl = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
    x_in, before = x.clone(), state.clone()
    out = causal_conv1d_update_v2(
        x, state, w, None, None, conv_state_indices=idx,
        num_accepted_tokens=torch.tensor(n_acc, dtype=torch.int32),
        query_start_loc=qsl, max_query_len=draft,
    )
    for i, s_b in enumerate(lengths):
        rows = slice(int(qsl[i]), int(qsl[i + 1]))
        line = int(idx[i])
        if s_b == 0:
            assert torch.equal(state[line], before[line])
            continue
        want, mag, new = oracle(x_in[rows][None], before[line][None], w, None, False, [n_acc[i] - 1])
        assert_close(out[rows], want[0], mag[0], torch.float16)
        run = width - 2 + s_b
        assert torch.equal(state[line, :run], torch.tensor(new[0], dtype=torch.float64).half()[-run:])
        assert torch.equal(state[line, run:], before[line, run:])


def test_v2_bf16_beyond_fp16_range_overflows():
    """Documented: operands are cast to fp16 before the multiply, even for bf16."""
    width, draft, dim = 4, 2, 3
    x = torch.tensor([[[70000.0, -70000.0, 1.0], [1.0, 1.0, 1.0]]], dtype=torch.bfloat16)
    state = torch.zeros(2, width - 2 + draft, dim, dtype=torch.bfloat16)
    state[1, -1, 2] = 1.0e5  # history value beyond fp16 range too
    w = torch.full((width, dim), 0.5, dtype=torch.bfloat16)
    idx = torch.tensor([1], dtype=torch.int32)
    exact, _ = causal_conv1d_update_reference(x, state[1:2], w)
    assert torch.isfinite(exact).all()  # mathematically finite in bf16
    out = causal_conv1d_update_v2(x.clone(), state, w, conv_state_indices=idx,
                                  num_accepted_tokens=torch.tensor([draft], dtype=torch.int32))
    assert out[0, 0, 0] == float("inf") and out[0, 0, 1] == float("-inf")
    assert out[0, 0, 2] == float("inf")  # from the history value
    assert out[0, 1, 0] == float("inf")  # x_0 is in token 1's window too
    # The state copy itself is not cast: the (finite) bf16 value is kept.
    assert torch.isfinite(state[1, width - 2, 0]) and state[1, width - 2, 0] == x[0, 0, 0]


def test_v2_fp32_operands_lose_fp16_precision():
    x = torch.tensor([[[1.0 + 2.0**-13]]])
    state = torch.zeros(1, 1, 1)
    w = torch.ones(2, 1)
    out = causal_conv1d_update_v2(x.clone(), state, w, conv_state_indices=torch.tensor([0], dtype=torch.int32))
    assert out.item() == 1.0  # exact maths would give 1 + 2^-13
    assert state[0, 0, 0].item() == 1.0 + 2.0**-13  # the state keeps the fp32 value


def test_v2_updates_the_tensor_object_given():
    """A strided conv_state is updated through its strides; a .contiguous() copy made
    by the caller takes the update and the original does not (caller's bug)."""
    width, draft, dim, lines = 3, 2, 4, 3
    state_len = width - 2 + draft
    g = torch.Generator().manual_seed(1)
    base = torch.randn(lines, dim, state_len, generator=g).half()
    view = base.transpose(1, 2)  # [lines, state_len, dim], not contiguous
    x = torch.randn(1, draft, dim, generator=g).half()
    w = torch.randn(width, dim, generator=g).half()
    idx = torch.tensor([2], dtype=torch.int32)
    nacc = torch.tensor([draft], dtype=torch.int32)
    want = torch.cat([view[2], x[0]])[-state_len:].clone()
    causal_conv1d_update_v2(x.clone(), view, w, conv_state_indices=idx, num_accepted_tokens=nacc)
    assert torch.equal(base.transpose(1, 2)[2], want)

    base2 = torch.randn(lines, dim, state_len, generator=g).half()
    view2 = base2.transpose(1, 2)
    keep = view2.clone()
    copy = view2.contiguous()
    causal_conv1d_update_v2(x.clone(), copy, w, conv_state_indices=idx, num_accepted_tokens=nacc)
    assert torch.equal(view2, keep)
    assert not torch.equal(copy[2], keep[2])


def test_v2_x_dtype_differs_from_state():
    """x is converted to the state dtype first; the caller's x is then left alone."""
    width, draft, dim = 3, 2, 4
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, draft, dim, generator=g)
    state = torch.randn(2, width - 2 + draft, dim, generator=g).half()
    w = torch.randn(width, dim, generator=g)
    x_in = x.clone()
    out = causal_conv1d_update_v2(x, state, w, conv_state_indices=torch.tensor([1], dtype=torch.int32),
                                  num_accepted_tokens=torch.tensor([draft], dtype=torch.int32))
    assert out.dtype == torch.float32 and out is not x and torch.equal(x, x_in)


# ----------------------------------------------------------------------------------
# AscendC model
# ----------------------------------------------------------------------------------


def run_ascendc(x, w, state, idx, b, draft, silu=False, **kw):
    return causal_conv1d_update_ascendc(
        x, w, state, idx, b, torch.full((x.shape[0],), draft, dtype=torch.int32), None, silu, -1, **kw
    )


@settings(**SETTINGS)
@given(
    seed=st.integers(0, 2**31 - 1),
    draft=st.sampled_from([3, 4]),
    batch=st.integers(1, 8),
    dim=st.sampled_from([1, 4, 8, 16]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    n_pad=st.integers(0, 3),
    with_bias=st.booleans(),
    silu=st.booleans(),
)
def test_ascendc_w4_d34_matches_oracle(seed, draft, batch, dim, dtype, n_pad, with_bias, silu):
    width = 4
    state_len = width - 2 + draft
    n_lines = batch + 4
    g, x, w, b, state = make_case(seed, batch, draft, dim, width, state_len, dtype, n_lines, with_bias)
    n_pad = min(n_pad, batch)
    idx = draw_indices(g, batch, n_lines, n_pad)
    x_in, before = x.clone(), state.clone()
    y = run_ascendc(x, w, state, idx, b, draft, silu)
    assert y is not x and torch.equal(x, x_in)  # a new tensor; x untouched
    want, mag, want_lines = oracle(x_in, before[idx.long().clamp_min(0)], w, b, silu, [draft - 1] * batch)
    # Also the package's own reference, on the same lines.
    ref_y, ref_lines = causal_conv1d_update_reference(x_in, before[idx.long().clamp_min(0)], w, b, silu)
    touched = set()
    for i in range(batch):
        line = int(idx[i])
        if line < 0:
            assert torch.isnan(y[i]).all()  # never written (empty_like garbage on the device)
            continue
        touched.add(line)
        assert_close(y[i], want[i], mag[i], dtype)
        assert_close(ref_y[i], want[i], mag[i], dtype)
        assert torch.equal(state[line], torch.tensor(want_lines[i], dtype=torch.float64).to(dtype))
        assert torch.equal(state[line], ref_lines[i])
    val = state_len - draft
    for line in range(n_lines):
        if line in touched:
            continue
        if line == 0 and n_pad > 0:
            # Pad indices are clamped to line 0 for the host pre-shift.
            assert torch.equal(state[0, :val], before[0, draft : draft + val])
            assert torch.equal(state[0, val:], before[0, val:])
        else:
            assert torch.equal(state[line], before[line]), f"line {line} changed"


@pytest.mark.parametrize("width", [3, 4])
@pytest.mark.parametrize("draft", [1, 2, 3, 4, 5, 6])
def test_ascendc_recorded_deviations_with_preshift(width, draft):
    """npu-ops.md 2.2 (builds with #428): output == maths iff D >= W-1; whole line ==
    cat(old, x)[-state_len:] for W=3: D in {1,2,3}, W=4: D in {2,3,4}; for D > W the
    slots [W-2, D-2) keep their old values."""
    state_len = width - 2 + draft
    batch, dim = 3, 8
    g, x, w, b, state = make_case(7 * width + draft, batch, draft, dim, width, state_len, torch.bfloat16, 5)
    idx = torch.tensor([3, 1, 4], dtype=torch.int32)
    before = state.clone()
    y = run_ascendc(x, w, state, idx, b, draft)
    want, mag, want_lines = oracle(x, before[idx.long()], w, b, False, [draft - 1] * batch)
    want_lines = torch.tensor(want_lines, dtype=torch.float64).to(torch.bfloat16)
    out_ok = close(y, want, mag, torch.bfloat16)
    assert out_ok == (draft >= width - 1)
    line_ok = all(torch.equal(state[int(idx[i])], want_lines[i]) for i in range(batch))
    assert line_ok == (draft in ({1, 2, 3} if width == 3 else {2, 3, 4}))
    if draft > width:
        stale = list(range(width - 2, draft - 2))
        for i in range(batch):
            line = int(idx[i])
            for s in range(state_len):
                if s in stale:
                    assert torch.equal(state[line, s], before[line, s])  # old value left behind
                    assert not torch.equal(state[line, s], want_lines[i, s])
                else:
                    assert torch.equal(state[line, s], want_lines[i, s])


def test_ascendc_w4_d1_d2_specific_errors():
    """Why D < W-1 fails with the pre-shift: the shift overwrites history slots before
    the kernel reads them. W=4, D=1: the window is (o1, o2, o2), line ends (o2, o2, x0).
    W=4, D=2: token 0 sees (o3, o2, o3); token 1 and the line are right."""
    width, dim, batch = 4, 8, 2
    for draft in (1, 2):
        state_len = width - 2 + draft
        g, x, w, b, state = make_case(11 + draft, batch, draft, dim, width, state_len, torch.float16, 4)
        idx = torch.tensor([2, 1], dtype=torch.int32)
        before = state.clone()
        y = run_ascendc(x, w, state, idx, b, draft)
        old = before[idx.long()]
        right, mag_r, _ = oracle(x, old, w, b, False, [draft - 1] * batch)
        if draft == 1:
            seen = torch.stack([old[:, 1], old[:, 2], old[:, 2]], dim=1)
            wrong, mag, _ = oracle(x, seen, w, b, False, [0] * batch)
            assert_close(y, wrong, mag, torch.float16)
            assert not close(y, right, mag_r, torch.float16)
            for i in range(batch):
                assert torch.equal(state[int(idx[i])], torch.stack([old[i, 2], old[i, 2], x[i, 0]]))
        else:
            seen = torch.stack([old[:, 3], old[:, 2], old[:, 3]], dim=1)
            wrong, mag, _ = oracle(x[:, :1], seen, w, b, False, [0] * batch)
            assert_close(y[:, :1], wrong, mag, torch.float16)
            assert not close(y[:, :1], right[:, :1], mag_r[:, :1], torch.float16)
            assert_close(y[:, 1:], right[:, 1:], mag_r[:, 1:], torch.float16)
            for i in range(batch):
                assert torch.equal(state[int(idx[i])], torch.cat([old[i], x[i]])[-state_len:])


@pytest.mark.parametrize("draft", [1, 2, 3, 4, 5, 6])
def test_ascendc_without_preshift(draft):
    """Builds before #428: output right for every D; slots [0, D-2) keep old values."""
    width, batch, dim = 4, 2, 4
    state_len = width - 2 + draft
    g, x, w, b, state = make_case(3 + draft, batch, draft, dim, width, state_len, torch.bfloat16, 4)
    idx = torch.tensor([1, 3], dtype=torch.int32)
    before = state.clone()
    y = run_ascendc(x, w, state, idx, b, draft, pre_shift=False)
    want, mag, want_lines = oracle(x, before[idx.long()], w, b, False, [draft - 1] * batch)
    want_lines = torch.tensor(want_lines, dtype=torch.float64).to(torch.bfloat16)
    assert_close(y, want, mag, torch.bfloat16)
    for i in range(batch):
        line = int(idx[i])
        for s in range(state_len):
            if s < draft - 2:
                assert torch.equal(state[line, s], before[line, s])
            else:
                assert torch.equal(state[line, s], want_lines[i, s])
    with pytest.raises(RuntimeError, match="428"):
        run_ascendc(x, w, state, torch.tensor([1, -1], dtype=torch.int32), b, draft, pre_shift=False)


def test_ascendc_module_default_is_preshift(monkeypatch):
    width, draft = 4, 5
    g, x, w, b, state = make_case(5, 1, draft, 4, width, width - 2 + draft, torch.bfloat16, 2)
    idx = torch.tensor([1], dtype=torch.int32)
    s1, s2 = state.clone(), state.clone()
    run_ascendc(x, w, s1, idx, b, draft)
    run_ascendc(x, w, s2, idx, b, draft, pre_shift=True)
    assert torch.equal(s1, s2)
    monkeypatch.setattr(conv1d, "ASCENDC_PRESHIFT", False)
    s3 = state.clone()
    run_ascendc(x, w, s3, idx, b, draft)
    assert not torch.equal(s3, s2)  # slot 0 stale without the pre-shift


def test_ascendc_pad_row_skew_inferred():
    """INFERRED (npu-ops.md 2.2): a pad entry skipped before the x/y row offset advances
    shifts the rows of the later items of the same vector core. 2 cores, batch 5:
    core 0 = items 0, 1; core 1 = items 2, 3, 4; item 2 is a pad."""
    width, draft, dim = 4, 3, 4
    state_len = width - 2 + draft
    g, x, w, b, state = make_case(21, 5, draft, dim, width, state_len, torch.bfloat16, 8)
    idx = torch.tensor([5, 2, -1, 7, 3], dtype=torch.int32)
    before = state.clone()
    y = run_ascendc(x, w, state, idx, b, draft, num_vector_cores=2)
    old = before[idx.long().clamp_min(0)]
    # Items 0, 1: own rows, right values.
    want, mag, lines01 = oracle(x[:2], old[:2], w, b, False, [draft - 1] * 2)
    assert_close(y[:2], want, mag, torch.bfloat16)
    # Item 3 reads item 2's x and writes item 2's y rows; item 4 reads item 3's x and
    # writes item 3's rows; item 4's rows are never written.
    shifted_x = torch.stack([x[2], x[3]])
    want, mag, lines34 = oracle(shifted_x, old[3:5], w, b, False, [draft - 1] * 2)
    assert_close(y[2:4], want, mag, torch.bfloat16)
    assert torch.isnan(y[4]).all()
    assert torch.equal(state[7], torch.tensor(lines34[0], dtype=torch.float64).bfloat16())
    assert torch.equal(state[3], torch.tensor(lines34[1], dtype=torch.float64).bfloat16())
    # With one item per core (the default core count) there is no skew.
    state2 = before.clone()
    y2 = run_ascendc(x, w, state2, idx, b, draft)
    want, mag, _ = oracle(x[3:], old[3:], w, b, False, [draft - 1] * 2)
    assert_close(y2[3:], want, mag, torch.bfloat16)
    assert torch.isnan(y2[2]).all()


def test_ascendc_int64_indices_are_misread_inferred():
    """INFERRED: the kernel reads int32 words; int64 [1, 2] reads as [1, 0] for items 0, 1
    (the host pre-shift still uses the true values)."""
    width = draft = 4
    state_len = width - 2 + draft
    g, x, w, b, state = make_case(4, 2, draft, 4, width, state_len, torch.float16, 3)
    before = state.clone()
    run_ascendc(x, w, state, torch.tensor([1, 2], dtype=torch.int64), b, draft)
    assert torch.equal(state[0, -1], x[1, -1])  # item 1 landed in line 0
    assert torch.equal(state[2, 2:], before[2, 2:])  # its own line only got the pre-shift
    assert torch.equal(state[1, -1], x[0, -1])


def test_ascendc_no_indices_is_batch_aligned():
    """An empty index tensor: item b uses line b, and the pre-shift runs on every line."""
    width = draft = 4
    state_len = width - 2 + draft
    g, x, w, b, state = make_case(9, 2, draft, 4, width, state_len, torch.bfloat16, 3)
    before = state.clone()
    y = causal_conv1d_update_ascendc(x, w, state, torch.empty(0, dtype=torch.int32), b,
                                     torch.full((2,), draft, dtype=torch.int32))
    want, mag, lines = oracle(x, before[:2], w, b, False, [draft - 1] * 2)
    assert_close(y, want, mag, torch.bfloat16)
    assert torch.equal(state[:2], torch.tensor(lines, dtype=torch.float64).bfloat16())
    val = state_len - draft
    assert torch.equal(state[2, :val], before[2, draft : draft + val])  # pre-shifted, not in batch


def test_ascendc_host_checks():
    x = torch.zeros(1, 2, 4, dtype=torch.bfloat16)
    w = torch.zeros(4, 4, dtype=torch.bfloat16)
    s = torch.zeros(2, 4, 4, dtype=torch.bfloat16)
    idx = torch.tensor([1], dtype=torch.int32)
    with pytest.raises(TypeError):
        causal_conv1d_update_ascendc(x.float(), w.float(), s.float(), idx)
    with pytest.raises(TypeError):
        causal_conv1d_update_ascendc(x, w.half(), s, idx)
    with pytest.raises(ValueError):
        causal_conv1d_update_ascendc(x.transpose(1, 2), w, s, idx)
    with pytest.raises(ValueError):
        causal_conv1d_update_ascendc(x, w, s.transpose(1, 2).contiguous().transpose(1, 2), idx)


def test_cast_round_ties_away_from_zero():
    # 1 + 2^-8 is exactly halfway between bf16 neighbours 1 and 1 + 2^-7.
    v = torch.tensor([1 + 2.0**-8, -(1 + 2.0**-8), 1 + 3 * 2.0**-8, 1 + 2.0**-9])
    got = _round_half_away(v, torch.bfloat16).float().tolist()
    assert got == [1 + 2.0**-7, -(1 + 2.0**-7), 1 + 2 * 2.0**-7, 1.0]
    assert v.bfloat16().float().tolist()[:2] == [1.0, -1.0]  # torch: ties to even
    h = torch.tensor([1 + 2.0**-11, 2.0**-25])  # fp16 tie; half the smallest subnormal
    assert _round_half_away(h, torch.float16).float().tolist() == [1 + 2.0**-10, 2.0**-24]
