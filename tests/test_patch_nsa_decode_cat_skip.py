"""nsa-decode-cat-skip against the real forward_absorb_core / NativeSparseAttnBackend of each release.

On 0.5.10.post1 and 0.5.11 the patch is applied through the loader with hardware
``rocm:gfx950`` (aiter is a test-bed stand-in here, so it counts as importable) and one
MLA attention layer runs through the real code (sgl_accel.cases.nsa_decode_cat_skip):
forward_absorb_core -> RadixAttention -> AttentionBackend.forward -> forward_decode /
forward_extend -> the tilelang or aiter decode entry point. ROCm (or CUDA / MUSA) is
emulated by setting the releases' module constants (_is_hip, _use_aiter,
_is_gfx95_supported, _use_aiter_gfx95, _is_cuda, _is_musa) for the duration of a call.
The decode entry points are the test bed's capture points (testing/kernels/rocm.py,
plain-torch sparse MLA attention), which keep the q they receive.

0.5.12.post1 has the change (``upstream``); 0.5.13.post1 moved the backend to
dsa_backend.py (with the change) and is outside the patch's range.
"""

import importlib
import os

import pytest

NAME = "nsa-decode-cat-skip"
RELEASE = os.environ.get("SGL_ACCEL_TEST_SGLANG") or ""
PRE_CHANGE = ("0.5.10.post1", "0.5.11")
MLA = "sglang.srt.models.deepseek_common.attention_forward_methods.forward_mla"
BACKEND = "sglang.srt.layers.attention.nsa_backend"
DSA_BACKEND = "sglang.srt.layers.attention.dsa_backend"

needs_pre_change = pytest.mark.skipif(RELEASE not in PRE_CHANGE, reason="the pre-change targets are in 0.5.10.post1 / 0.5.11")


def cases():
    from sgl_accel.cases import nsa_decode_cat_skip

    return nsa_decode_cat_skip


# --------------------------------------------------------------------------- release-free


def test_hardware_check_wants_gfx95_and_aiter():
    from sgl_accel._detect import Hardware
    from sgl_accel.patches.nsa_decode_cat_skip import PATCH

    check = PATCH.hardware_check
    assert check(Hardware("rocm", "gfx950", {"aiter": True})) is None
    assert "gfx95" in check(Hardware("rocm", "gfx942", {"aiter": True}))
    assert "unknown" in check(Hardware("rocm", None, {"aiter": True}))
    assert "aiter" in check(Hardware("rocm", "gfx950", {"aiter": False}))
    assert PATCH.hardware == ("rocm",)
    assert len(PATCH.parts) == 1 and len(PATCH.parts[0].targets) == 2  # both targets or neither


def test_registered():
    from sgl_accel import _registry

    assert "nsa_decode_cat_skip" in _registry.patch_modules()
    assert NAME in _registry.all_patches()


# --------------------------------------------------------------------------- structure per release


def _root():
    from sgl_accel._detect import sglang_install

    return sglang_install().location


@pytest.mark.sglang
def test_structural_guard_per_release(sglang_release):
    """What the guard says about the release's source (no import)."""
    from sgl_accel._guard import check_static
    from sgl_accel._registry import Target
    from sgl_accel.patches.nsa_decode_cat_skip import PATCH

    absorb, decode = PATCH.targets
    root = _root()
    states = [check_static(t, root).state for t in (absorb, decode)]
    if RELEASE in PRE_CHANGE:
        assert states == ["applies", "applies"]
    elif RELEASE == "0.5.12.post1":
        assert states == ["upstream", "upstream"]
    elif RELEASE == "0.5.13.post1":
        # forward_mla has the change; the backend moved to dsa_backend (with the change too).
        assert states == ["upstream", "absent"]
        moved = Target(DSA_BACKEND, "DeepseekSparseAttnBackend.forward_decode", rules=decode.rules, upstream=decode.upstream)
        assert check_static(moved, root).state == "upstream"
    else:
        pytest.skip(f"no expectation for {RELEASE}")


@pytest.mark.sglang
def test_plan_per_release(sglang_release):
    from sgl_accel._detect import Hardware, sglang_install
    from sgl_accel._plan import plan_patch
    from sgl_accel.patches.nsa_decode_cat_skip import PATCH

    install = sglang_install()
    report = plan_patch(PATCH, install.location, install.version, Hardware("rocm", "gfx950", {"aiter": True}), check_tested=False)
    expected = {"0.5.10.post1": "applies", "0.5.11": "applies", "0.5.12.post1": "upstream", "0.5.13.post1": "upstream"}
    assert report.state == expected[RELEASE], report.reason
    if RELEASE == "0.5.13.post1":  # the backend target moved to dsa_backend with the NSA->DSA rename
        assert "sglang.srt.layers.attention.dsa_backend:DeepseekSparseAttnBackend.forward_decode" in [t.target for t in report.targets]
    cuda = plan_patch(PATCH, install.location, install.version, Hardware("cuda", "sm90"), check_tested=False)
    assert cuda.state == "not-applicable"


def _import_targets():
    return importlib.import_module(MLA), importlib.import_module(BACKEND)


@pytest.mark.sglang
def test_apply_per_release(accel, sglang_release):
    """apply() on emulated ROCm gfx950: applied before the change, upstream after (on 0.5.13
    in dsa_backend, where the backend moved)."""
    import sgl_accel

    accel("rocm:gfx950")
    if RELEASE == "0.5.13.post1":
        fm = importlib.import_module(MLA)
        dsa = importlib.import_module(DSA_BACKEND)  # what 0.5.13 imports; its nsa_backend shim does not import
        before = dsa.DeepseekSparseAttnBackend.__dict__["forward_decode"]
        report = sgl_accel.apply([NAME])[NAME]
        assert report.state == "upstream", report.reason
        assert dsa.DeepseekSparseAttnBackend.__dict__["forward_decode"] is before
        return
    fm, nb = _import_targets()
    before = (fm.DeepseekMLAForwardMixin.__dict__["forward_absorb_core"], nb.NativeSparseAttnBackend.__dict__["forward_decode"])
    report = sgl_accel.apply([NAME])[NAME]
    after = (fm.DeepseekMLAForwardMixin.__dict__["forward_absorb_core"], nb.NativeSparseAttnBackend.__dict__["forward_decode"])
    if RELEASE in PRE_CHANGE:
        assert report.state == "applied", report.reason
        assert all(a is not b and a.__sgl_accel_original__ is b for a, b in zip(after, before))
        sgl_accel.revert([NAME])
        restored = (fm.DeepseekMLAForwardMixin.__dict__["forward_absorb_core"], nb.NativeSparseAttnBackend.__dict__["forward_decode"])
        assert all(r is b for r, b in zip(restored, before))
    else:
        assert report.state == "upstream", report.reason
        assert after == before


@pytest.mark.sglang
@needs_pre_change
@pytest.mark.parametrize("hardware", ["cuda", "rocm:gfx942", "rocm", "cpu"])
def test_not_applied_elsewhere(accel, sglang_release, hardware):
    import sgl_accel

    fm, nb = _import_targets()
    before = (fm.DeepseekMLAForwardMixin.__dict__["forward_absorb_core"], nb.NativeSparseAttnBackend.__dict__["forward_decode"])
    accel(hardware)
    report = sgl_accel.apply([NAME])[NAME]
    assert report.state == "not-applicable", report.reason
    after = (fm.DeepseekMLAForwardMixin.__dict__["forward_absorb_core"], nb.NativeSparseAttnBackend.__dict__["forward_decode"])
    assert after == before


@pytest.mark.sglang
@needs_pre_change
def test_rewritten_source_changes_only_the_handover():
    from sgl_accel._plan import diff_patch
    from sgl_accel.patches.nsa_decode_cat_skip import PATCH

    ok, text = diff_patch(PATCH, _root())
    assert ok, text
    added = [l[1:].strip() for l in text.splitlines() if l.startswith("+") and not l.startswith("+++")]
    removed = [l[1:].strip() for l in text.splitlines() if l.startswith("-") and not l.startswith("---")]
    assert added.count("if q_all is None or not _is_hip:") == 2
    assert removed.count("if q_rope is not None:") == 2  # tilelang and aiter; flashmla keeps its own
    assert "q_all = None" in added
    assert any("q_rope=None" in l and l.startswith("attn_output = self.attn_mqa(q_cat,") for l in added)
    assert "if forward_batch.forward_mode.is_decode_or_idle():" in added
    assert not any("q_cat[..., :self.kv_lora_rank] *=" in l for l in added)  # no __setitem__ copy


# --------------------------------------------------------------------------- behaviour (0.5.10.post1, 0.5.11)


@pytest.fixture
def fns(accel, sglang_release):
    """The patch applied through the loader on emulated ROCm gfx950; (original, patched) per target."""
    import sgl_accel

    if RELEASE not in PRE_CHANGE:
        pytest.skip("the pre-change targets are in 0.5.10.post1 / 0.5.11")
    _import_targets()
    accel("rocm:gfx950")
    report = sgl_accel.apply([NAME])[NAME]
    assert report.state == "applied", report.reason
    return cases().functions()


def _spec(**kw):
    # A top-k of 256 keeps the reference attention cheap; CASES use the models' 2048.
    return cases().Spec(**{"topk": 256, **kw})


def _delta(original, patched):
    return cases().op_delta(original, patched)


def _assert_same_q_at_entries(original, patched):
    import torch

    C = cases()
    assert patched.entries == original.entries and patched.entries
    for qp, qo in zip(patched.entry_q, original.entry_q):
        assert qp.shape == qo.shape and qp.dtype == qo.dtype
        assert torch.equal(C._bytes_view(qp), C._bytes_view(qo))  # byte-identical


@pytest.mark.sglang
@pytest.mark.parametrize("impl,dtype", [("tilelang", "bfloat16"), ("aiter", "bfloat16"), ("tilelang", "float32")])
def test_decode_hands_q_cat_to_the_kernel(fns, impl, dtype):
    """ROCm decode: the entry point gets q_cat itself (a view), byte-identical to the
    original's re-concatenation, and the layer runs one concatenation fewer."""
    import torch

    C = cases()
    spec = _spec(batch=3, heads=16, impl=impl, dtype=dtype)
    comparisons, original, patched = C.evaluate(spec, fns=fns)
    assert all(c.passed for c in comparisons), [(c.what, c.max_abs_diff, c.note) for c in comparisons if not c.passed]
    _assert_same_q_at_entries(original, patched)
    for q in patched.entry_q:
        assert q.untyped_storage().data_ptr() == patched.q_cat.untyped_storage().data_ptr()
    for q in original.entry_q:
        assert q.untyped_storage().data_ptr() != original.q_cat.untyped_storage().data_ptr()
    assert torch.equal(patched.output, original.output)
    assert torch.equal(patched.kv, original.kv)
    delta = _delta(original, patched)
    element = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    removed = spec.tokens * spec.heads * 576 * element
    assert delta["ops"].get("aten.cat.default") == 1
    assert delta["allocations"] == 1
    assert delta["bytes_allocated"] == removed and delta["bytes_written"] == removed
    assert set(delta["ops"]) - {"aten.cat.default"} <= {"aten.view.default", "aten.slice.Tensor"}
    if impl == "tilelang":
        assert len(original.concat_q) == 1 and not patched.concat_q  # concat_mla_absorb_q_general skipped


@pytest.mark.sglang
def test_decode_aiter_with_padded_heads(fns):
    """8 heads per rank: aiter pads to 16 by repeat_interleave; values still identical."""
    import torch

    C = cases()
    comparisons, original, patched = C.evaluate(_spec(batch=2, heads=8, impl="aiter"), fns=fns)
    assert all(c.passed for c in comparisons), [(c.what, c.note) for c in comparisons if not c.passed]
    _assert_same_q_at_entries(original, patched)
    q = patched.entry_q[0]
    if q.shape[1] == 8:  # 0.5.10.post1's _forward_aiter does not pad: the kernel gets q_cat itself
        assert q.untyped_storage().data_ptr() == patched.q_cat.untyped_storage().data_ptr()
    else:  # 0.5.11 pads 8 heads to 16 (repeat_interleave), a copy in both
        assert q.shape[1] == 16
    assert torch.equal(patched.output, original.output)
    assert _delta(original, patched)["ops"].get("aten.cat.default") == 1


@pytest.mark.sglang
@pytest.mark.parametrize("mode", ["decode", "extend"])
def test_llama_4_scaling_equals_original(fns, mode):
    """The absorbed half of q_cat is scaled in place, the rope half is not; same results as
    the original; on decode no copy of the scaled half is added (upstream's
    q_cat[..., :512] *= s would add one through __setitem__)."""
    import torch

    C = cases()
    spec = _spec(batch=3, heads=16, mode=mode, llama_4_scaling=True)
    comparisons, original, patched = C.evaluate(spec, fns=fns)
    assert all(c.passed for c in comparisons), [(c.what, c.note) for c in comparisons if not c.passed]
    assert torch.equal(patched.q_cat, original.q_cat)
    assert torch.equal(patched.output, original.output)
    # The scaling did happen: without it the layer gives another output.
    _, _, unscaled = C.evaluate(_spec(batch=3, heads=16, mode=mode), fns=fns)
    assert not torch.equal(unscaled.output, patched.output)
    assert torch.equal(unscaled.q_cat[..., 512:], patched.q_cat[..., 512:])  # rope half untouched
    delta = _delta(original, patched)
    assert "aten.copy_.default" not in delta["ops"] and "aten.mul_.Tensor" not in delta["ops"]


@pytest.mark.sglang
@pytest.mark.parametrize(
    "kw",
    [
        dict(mode="extend"),
        dict(mode="extend", batch=1, extend_len=5),
        dict(mode="idle"),
        dict(platform="cuda"),
        dict(platform="cuda", impl="aiter"),
        dict(platform="musa"),
    ],
    ids=["rocm-extend", "rocm-extend-b1", "rocm-idle", "cuda-tilelang", "cuda-aiter", "musa"],
)
def test_unchanged_paths(fns, kw):
    """Prefill/extend keeps the split form; CUDA and MUSA run exactly what they ran before."""
    import torch

    C = cases()
    comparisons, original, patched = C.evaluate(_spec(**{"batch": 3, "heads": 16, **kw}), fns=fns)
    assert all(c.passed for c in comparisons), [(c.what, c.note) for c in comparisons if not c.passed]
    if kw.get("mode") != "idle":
        _assert_same_q_at_entries(original, patched)
        assert len(patched.concat_q) == len(original.concat_q)
    assert torch.equal(patched.output, original.output)
    assert torch.equal(patched.kv, original.kv)
    assert dict(patched.counter.ops) == dict(original.counter.ops) or kw.get("mode") == "idle"
    delta = _delta(original, patched)
    assert delta["bytes_allocated"] == delta["bytes_written"] == delta["allocations"] == 0


@pytest.mark.sglang
def test_forward_decode_with_q_rope_none_on_cuda_still_concatenates(fns):
    """A caller handing forward_decode one concatenated q on CUDA: it is re-concatenated
    as before (the skip is HIP-only), with identical bytes."""
    import torch

    C = cases()
    bed = C.build(_spec(batch=2, heads=16, platform="cuda"))
    decode_o, decode_p = fns["decode"]
    q = torch.randn(2, 16, 576).to(torch.bfloat16)
    got = {}
    from sgl_accel.testing.kernels.rocm import DecodeRecorder
    from sgl_accel.testing.opcount import OpCounter

    for label, fn in (("original", decode_o), ("patched", decode_p)):
        rec = DecodeRecorder()
        with C.emulated(C._emulation(bed.spec, bed)), rec.installed(importlib.import_module(BACKEND)), OpCounter() as counter:
            out = fn(bed.backend, q, None, None, bed.layer.attn_mqa, bed.forward_batch, save_kv_cache=False,
                     q_rope=None, topk_indices=bed.inputs["topk_indices"])
        got[label] = (out, rec.decode_calls[0].q, counter)
    assert torch.equal(got["original"][0], got["patched"][0])
    assert torch.equal(got["original"][1], got["patched"][1])
    assert got["patched"][1].untyped_storage().data_ptr() != q.untyped_storage().data_ptr()
    assert got["original"][2].count("aten.cat") == got["patched"][2].count("aten.cat") == 1


@pytest.mark.sglang
def test_checks_can_fail(fns):
    """The case's removal checks fail when nothing is removed (original on both sides)."""
    C = cases()
    same = {k: (o, o) for k, (o, _) in fns.items()}
    comparisons, _, _ = C.evaluate(_spec(batch=2, heads=16), fns=same)
    failed = {c.what for c in comparisons if not c.passed}
    assert {"aten.cat calls removed", "bytes allocated removed", "patched entry q is a view of q_cat"} <= failed


@pytest.mark.sglang
def test_equivalence_cases_pass(fns):
    C = cases()
    for case in C.CASES:
        comparisons = case.run(0)
        assert comparisons and all(c.passed for c in comparisons), (case.name, [(c.what, c.note) for c in comparisons if not c.passed])


@pytest.mark.sglang
@pytest.mark.parametrize("impl", ["tilelang", "aiter"])
def test_bench_pair(fns, impl):
    """decode_pair: the bench's original/patched forward_decode calls agree; one cat fewer."""
    import torch
    from sgl_accel.testing.opcount import OpCounter

    C = cases()
    original, patched = C.decode_pair(4, 16, impl=impl, topk=64, max_context=64)
    with OpCounter() as co:
        out_o = original()
    with OpCounter() as cp:
        out_p = patched()
    assert torch.equal(out_o, out_p)
    assert co.count("aten.cat") - cp.count("aten.cat") == 1
    assert co.bytes_allocated - cp.bytes_allocated == 4 * 16 * 576 * 2
    assert [b.patch for b in C.BENCH] == [NAME] * len(C.BENCH)


@pytest.mark.sglang
def test_emulation_is_undone(fns):
    fm, nb = _import_targets()
    utils = importlib.import_module("sglang.srt.layers.attention.utils")
    before = (fm._is_hip, fm._use_aiter_gfx95, nb._is_hip, utils._is_cuda, "fused_qk_rope_cat_and_cache_mla" in vars(fm),
              "mla_decode_fwd" in vars(nb), fm.get_global_server_args)
    cases().evaluate(_spec(batch=1, heads=16, impl="aiter"), fns=fns)
    after = (fm._is_hip, fm._use_aiter_gfx95, nb._is_hip, utils._is_cuda, "fused_qk_rope_cat_and_cache_mla" in vars(fm),
             "mla_decode_fwd" in vars(nb), fm.get_global_server_args)
    assert after == before
    assert "forward_decode" not in vars(cases().build(_spec(batch=1, heads=16)).backend)


# --------------------------------------------------------------------------- the aiter model


@pytest.mark.sglang
@pytest.mark.parametrize("is_neox", [False, True])
def test_fused_rope_cat_model_against_sglang_rope(is_neox):
    """The model of aiter's fused_qk_rope_cat_and_cache_mla against sglang's own
    apply_rotary_emb (rotary_embedding/utils.py), an independent RoPE."""
    import torch
    from sglang.srt.layers.rotary_embedding.utils import apply_rotary_emb

    C = cases()
    g = torch.Generator().manual_seed(3)
    T, H = 5, 4
    q_nope, q_pe = torch.randn(T, H, 512, generator=g), torch.randn(T, H, 64, generator=g)
    k_nope, k_pe = torch.randn(T, 1, 512, generator=g), torch.randn(T, 1, 64, generator=g)
    kv = torch.zeros(12, 1, 576)
    slots = torch.tensor([3, 7, -1, 0, 11])
    pos = torch.tensor([0, 9, 4, 17, 2])
    cos, sin = C.rope_cos_sin(32)
    k_scale = torch.tensor([2.0])
    q_out, q_pe_out, k_pe_out, kv_out = C.fused_qk_rope_cat_and_cache_mla_model(
        q_nope, q_pe, k_nope, k_pe, kv, slots, pos, cos, sin, k_scale, is_neox)
    assert kv_out is kv and q_out.shape == (T, H, 576) and q_pe_out.shape == (0, H, 64)
    q_rot = apply_rotary_emb(q_pe, cos[pos], sin[pos], is_neox)
    k_rot = apply_rotary_emb(k_pe, cos[pos], sin[pos], is_neox)
    assert torch.equal(q_out[..., :512], q_nope)
    torch.testing.assert_close(q_out[..., 512:], q_rot, rtol=1e-6, atol=1e-6)
    written = slots >= 0
    torch.testing.assert_close(k_pe_out[written], k_rot[written], rtol=1e-6, atol=1e-6)
    expected = torch.zeros_like(kv)
    expected[slots[written]] = torch.cat([k_nope, k_rot], -1)[written] / 2.0
    torch.testing.assert_close(kv, expected, rtol=1e-6, atol=1e-6)
    # bf16 q_out dtype and the decode-zeros outputs
    out = C.fused_qk_rope_cat_and_cache_mla_model(q_nope, q_pe, k_nope, k_pe, torch.zeros(12, 1, 576), slots, pos, cos, sin,
                                                   None, is_neox, num_decode_toks_for_zeros=2, q_out_dtype=torch.bfloat16)
    assert len(out) == 5 and out[0].dtype == torch.bfloat16 and torch.equal(out[4], torch.zeros(2, H, 512))
    torch.testing.assert_close(out[1], q_rot[:2], rtol=1e-6, atol=1e-6)
