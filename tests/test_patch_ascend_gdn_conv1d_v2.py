"""ascend-gdn-conv1d-v2 (upstream #24595) against the real AscendGDNAttnBackend of each release.

The target-verify branch of ``forward_extend`` runs for real (pool, backend, layer and
ForwardBatch are sglang's own objects, see sgl_accel.cases.ascend_gdn_conv1d_v2) with the
test-bed kernels, up to the end of the conv update, and is checked against the
mathematical reference: outputs and whole conv-state lines. 0.5.11 is the release the
patch applies to; 0.5.12.post1 / 0.5.13.post1 already carry the change (their code is
also the "upstream form" compared against); 0.5.10.post1 has no GDN backend.
"""

import ast
import contextlib
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest

pytestmark = pytest.mark.sglang

NAME = "ascend-gdn-conv1d-v2"
MODULE = "sglang.srt.hardware_backend.npu.attention.ascend_gdn_backend"
ROOT = Path(__file__).resolve().parents[1]
UPSTREAM_RELEASE = "0.5.12.post1"  # the first release with #24595


@pytest.fixture(scope="module")
def gdn(sglang_release):
    try:
        return importlib.import_module(MODULE)
    except ModuleNotFoundError as exc:
        if exc.name and MODULE.startswith(exc.name):
            pytest.skip(f"sglang {sglang_release} has no {MODULE}")
        raise


@pytest.fixture(scope="module")
def cases():
    from sgl_accel.cases import ascend_gdn_conv1d_v2

    return ascend_gdn_conv1d_v2


def _apply(accel, hardware="ascend"):
    import sgl_accel

    accel(hardware)
    # No compatibility matrix ships with the tree yet: the tested-source policy is waived.
    return sgl_accel.apply([NAME], allow_untested=True)[NAME]


@pytest.fixture
def patched(accel, gdn):
    """The patch applied on the release under test (skips where the release has the change)."""
    report = _apply(accel)
    if report.state == "upstream":
        pytest.skip(f"this release already has #24595 ({report.reason})")
    assert report.state == "applied", f"{report.state}: {report.reason}"
    return report


def _failed(comparisons):
    return [f"{c.what}: {c.max_abs_diff:g} (tol {c.tolerance:g}) {c.note}" for c in comparisons if not c.passed]


# --------------------------------------------------------------------------- equivalence


def _spec_ids():
    from sgl_accel.cases.ascend_gdn_conv1d_v2 import SPECS

    return [s.label() for s in SPECS]


@pytest.mark.parametrize("index", range(len(_spec_ids())), ids=_spec_ids())
def test_verify_step_matches_reference(patched, cases, index):
    spec = cases.SPECS[index]
    for seed in (0, 1):
        outcome = cases.evaluate(spec, seed)
        assert outcome.runs["patched"].error is None, repr(outcome.runs["patched"].error)
        assert not _failed(outcome.patched), _failed(outcome.patched)


def test_ascendc_deviations_are_correctness_gains(patched, cases):
    """Draft lengths 1-5, width 4: wherever the original AscendC op leaves the mathematics
    (outputs or whole conv lines), the patched branch does not."""
    agree, deviate = [], {}
    for draft in range(1, 6):
        outcome = cases.evaluate(cases.Spec(draft=draft), seed=draft)
        assert not _failed(outcome.patched), (draft, _failed(outcome.patched))
        if outcome.original_deviates:
            deviate[draft] = _failed(outcome.original) or [repr(outcome.original_error)]
        else:
            agree.append(draft)
    # Both kinds must occur: agreement shows the harness reads the original's results
    # correctly, deviation is what the patch gains.
    assert deviate, "the AscendC op matched the reference for every draft length"
    assert agree, deviate
    print("AscendC op matches the reference for D =", agree, "; deviates for", deviate)


def test_ascendc_pad_skew_is_a_correctness_gain(patched, cases):
    """A pad entry that is not the last item of an AscendC core shifts the x rows read for
    the items after it on that core; v2 has no such coupling."""
    spec = cases.Spec(draft=3, batch=50, heads=(1, 2, 1, 4), pads=(47,), spare_lines=2)
    outcome = cases.evaluate(spec, seed=3)
    assert not _failed(outcome.patched), _failed(outcome.patched)
    original = outcome.runs["original"].out.view(spec.batch, spec.draft, spec.dim)
    want = outcome.reference[0].view(spec.batch, spec.draft, spec.dim)
    first = original[:47].float() - want[:47].float()
    assert float(first.abs().max()) <= cases.output_tolerance(original.dtype, want[:47]), "items before the pad"
    assert not bool(((original[48:] - want[48:]).abs() <= 1e-2).all()), "items after the pad on the same core"


def test_verify_command_runs_all_cases(patched, cases):
    from sgl_accel import _verify

    result = _verify.run_cases(NAME)
    assert result.outcome == "pass", result.reason
    assert len(result.cases) == len(cases.CASES)


# --------------------------------------------------------------------------- upstream form


def _upstream_forward_extend(gdn, release):
    """forward_extend as sglang 0.5.12.post1 ships it (#24595, the upstream form)."""
    from packaging.version import Version

    if release >= Version(UPSTREAM_RELEASE):
        return gdn.AscendGDNAttnBackend.__dict__["forward_extend"]
    path = ROOT / ".envs" / f"sglang-{UPSTREAM_RELEASE}" / "sglang/srt/hardware_backend/npu/attention/ascend_gdn_backend.py"
    if not path.is_file():
        pytest.skip(f"sglang {UPSTREAM_RELEASE} is not installed in .envs")
    from sgl_accel._rewrite import compile_def, find_def

    node = find_def(ast.parse(path.read_text()), "AscendGDNAttnBackend.forward_extend")
    from sgl_kernel_npu.mamba.causal_conv1d import causal_conv1d_update_v2

    # The 0.5.12.post1 code, compiled into this release's module (the kernel name it
    # imports at module level is handed in as a closure variable).
    return compile_def(node, str(path), gdn.__dict__, {"causal_conv1d_update_v2": causal_conv1d_update_v2}, decorators=False)


def test_upstream_form_loses_update_on_strided_cache(accel, gdn, cases, sglang_release):
    """The per-layer conv cache as a strided view (a layer-interleaved pool): upstream's
    ``conv_states.contiguous()`` hands the kernel a copy and the update is lost; the
    patched branch updates the cache itself."""
    upstream = _upstream_forward_extend(gdn, sglang_release)
    spec = cases.Spec(draft=4, layout="layer-interleaved")
    bed = cases.build(spec, seed=5)
    assert not bed.conv[cases.LAYERS.index(cases.LAYER_ID)].is_contiguous()
    expected_out, expected_conv = cases.reference(bed)
    live = sorted(set(bed.slots))
    layer = cases.LAYERS.index(cases.LAYER_ID)
    assert not bool((expected_conv[layer, live] == bed.conv_initial[layer, live]).all())

    run = cases.run_branch(bed, upstream)
    assert run.error is None, repr(run.error)
    # Outputs are right, but every line is as it was: the state update went to a copy.
    assert not _failed(cases.comparisons(bed, run, expected_out, expected_conv)[:1])
    assert bool((run.conv == bed.conv_initial).all())

    report = _apply(accel)
    if report.state == "upstream":
        return  # this release is the upstream form; there is nothing of ours to run
    assert report.state == "applied", report.reason
    _, ours = cases.functions(gdn)
    mine = cases.run_branch(bed, ours)
    assert not _failed(cases.comparisons(bed, mine, expected_out, expected_conv))


def test_pad_slot_id_comes_from_the_backend(accel, gdn, cases, sglang_release):
    """A backend whose pad_slot_id is not -1: the original (AscendC, self.pad_slot_id) and the
    patched branch skip its pad entries; upstream's hard-coded -1 reads them as line numbers."""
    upstream = _upstream_forward_extend(gdn, sglang_release)
    spec = cases.Spec(draft=3, pads=(0, 2), pad_slot_id=-2)
    bed = cases.build(spec, seed=6)
    run = cases.run_branch(bed, upstream)
    assert isinstance(run.error, IndexError), repr(run.error)  # line -2: outside the pool

    report = _apply(accel)
    if report.state == "upstream":
        return
    assert report.state == "applied", report.reason
    outcome = cases.evaluate(spec, seed=6)
    assert not _failed(outcome.patched), _failed(outcome.patched)
    assert outcome.original_error is None
    # The original skips the same entries (its only deviation here is the dummy line 0).
    assert all("line 0" in f for f in _failed(outcome.original)), _failed(outcome.original)


# --------------------------------------------------------------------------- costs and buffers


@contextlib.contextmanager
def _v2_as_one_kernel(monkeypatch, calls):
    """Count the test-bed v2 kernel as one launch: its Python body is not dispatched to the
    counter (a device kernel is one op, as the AscendC torch op is)."""
    import torch.utils._python_dispatch as dispatch

    from sgl_accel.testing.kernels import conv1d

    model = conv1d.causal_conv1d_update_v2

    def one_launch(*args, **kwargs):
        calls.append(1)
        with dispatch._disable_current_modes():
            return model(*args, **kwargs)

    monkeypatch.setattr(conv1d, "causal_conv1d_update_v2", one_launch)
    yield


def test_no_per_call_weight_copy(patched, cases, monkeypatch):
    """OpCounter over the branch, two calls each: the original transposes and copies the
    conv weights on every call; the patched branch never copies them (the kernel reads the
    transposed view) and writes its output into mixed_qkv instead of a new buffer."""
    from sgl_accel.testing.opcount import OpCounter

    bed = cases.build(cases.Spec(draft=4, heads=(2, 8, 4, 8)), seed=7)
    original, ours = cases.functions(bed.module)
    counts = {}
    calls = []
    with _v2_as_one_kernel(monkeypatch, calls):
        for label, fn in (("original", original), ("patched", ours)):
            for call in (1, 2):
                counter = OpCounter()
                launched = len(calls)
                run = cases.run_branch(bed, fn, around=counter)
                assert run.error is None, repr(run.error)
                if len(calls) > launched:
                    counter.ops["sgl_kernel_npu.causal_conv1d_update_v2.kernel"] += len(calls) - launched
                counts[label, call] = counter
    assert len(calls) == 2  # one v2 launch per patched call
    weight_bytes = bed.layer.conv_weights.numel() * bed.layer.conv_weights.element_size()
    out_bytes = bed.spec.batch * bed.spec.draft * bed.spec.dim * bed.mixed_qkv.element_size()
    for call in (1, 2):
        before, after = counts["original", call], counts["patched", call]
        assert before.count("aten.clone") >= 1, before.summary()
        assert before.count("npu.causal_conv1d_update") == 1
        assert after.count("aten.clone") == 0 and after.count("aten.copy_") == 0, after.summary()
        assert after.bytes_allocated <= before.bytes_allocated - weight_bytes - out_bytes, (before.summary(), after.summary())
    print("original:", counts["original", 2].summary())
    print("patched: ", counts["patched", 2].summary())
    print("patched vs original:", counts["patched", 2].diff(counts["original", 2]))


def test_only_mixed_qkv_is_written(patched, cases):
    """v2 writes its result into x's storage, i.e. mixed_qkv (rows of the real tokens);
    a, b, weights, bias, padding rows and other lines are left as they were."""
    spec = cases.Spec(draft=3, padded_rows=2)
    bed = cases.build(spec, seed=8)
    _, ours = cases.functions(bed.module)
    weights, bias = bed.layer.conv_weights.clone(), bed.layer.bias.clone()
    x = bed.mixed_qkv.clone()
    run = cases.run_branch(bed, ours, x=x)
    real = spec.batch * spec.draft
    assert bool((run.mixed_qkv[:real] == run.out).all()), "output not in mixed_qkv's storage"
    assert bool((run.mixed_qkv[real:] == bed.mixed_qkv[real:].cpu()).all()), "padding rows written"
    assert bool((bed.layer.conv_weights == weights).all()) and bool((bed.layer.bias == bias).all())
    assert not _failed(cases.comparisons(bed, run, *cases.reference(bed)))


def _reads_after(func: ast.FunctionDef, call: ast.Call, name: str) -> list:
    end = (call.end_lineno, call.end_col_offset)
    return [
        n.lineno for n in ast.walk(func)
        if isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load) and (n.lineno, n.col_offset) > end
    ]


def test_gdn_callers_drop_mixed_qkv_after_attention(gdn, sglang_release):
    """The premise of writing into mixed_qkv: every model that hands mixed_qkv to the linear
    attention never reads it afterwards (checked on this release's model sources)."""
    import sglang

    checked = []
    for path in sorted((Path(sglang.__file__).parent / "srt" / "models").glob("*.py")):
        text = path.read_text(encoding="utf-8-sig")
        if "mixed_qkv=" not in text:
            continue
        tree = ast.parse(text)
        for func in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            for call in (n for n in ast.walk(func) if isinstance(n, ast.Call)):
                if any(k.arg == "mixed_qkv" for k in call.keywords) and isinstance(call.func, ast.Attribute) and call.func.attr == "attn":
                    assert not _reads_after(func, call, "mixed_qkv"), f"{path.name}:{func.name} reads mixed_qkv after self.attn"
                    checked.append(f"{path.name}:{func.name}")
    assert any(c.startswith("qwen3_next") for c in checked) and any(c.startswith("qwen3_5") for c in checked), checked


# --------------------------------------------------------------------------- weights


def test_weight_reload_reaches_the_kernel(patched, cases):
    """sglang reloads weights in place through param.data, which leaves _version (and the
    data pointer) unchanged, so a cache keyed on them would serve the old weights. The
    patched branch reads the live weights through a view: the next verify step uses the
    reloaded ones."""
    import torch
    from sglang.srt.layers.attention.mamba.mamba import mamba_v2_sharded_weight_loader
    from sglang.srt.model_loader.weight_utils import default_weight_loader

    spec = cases.Spec(draft=4)
    bed = cases.build(spec, seed=9)
    _, ours = cases.functions(bed.module)
    nk, hk, nv, hv = spec.heads
    loaders = {
        "mamba_v2_sharded_weight_loader": mamba_v2_sharded_weight_loader(
            [(nk * hk, 0, False), (nk * hk, 0, False), (nv * hv, 0, False)], 1, 0
        ),
        "default_weight_loader": default_weight_loader,
    }
    previous = cases.reference(bed)
    for seed, (label, loader) in enumerate(loaders.items(), start=10):
        view = bed.layer.conv_weights
        key = (id(view), view.data_ptr(), view._version, bed.weight_param._version)
        new = (torch.randn(bed.weight_param.shape, generator=torch.Generator().manual_seed(seed)) * 0.5).to(view.dtype)
        loader(bed.weight_param, new)
        assert bool((view == new.view(view.shape)).all()), f"{label} did not write the weights"
        assert (id(view), view.data_ptr(), view._version, bed.weight_param._version) == key, label
        expected = cases.reference(bed)
        assert not torch.equal(expected[0], previous[0])  # the reloaded weights change the outputs
        run = cases.run_branch(bed, ours)
        assert not _failed(cases.comparisons(bed, run, *expected)), (label, _failed(cases.comparisons(bed, run, *expected)))
        previous = expected


# --------------------------------------------------------------------------- bf16 beyond fp16


def test_bf16_values_beyond_fp16_range(patched, cases):
    """Decided behaviour (module docstring): v2 multiplies fp16 operands. bf16 values inside
    fp16's range give the reference's results (exact operands); |v| >= 65520 turns the output
    rows whose window holds it into +-inf/NaN, while the conv line keeps the exact value.
    The AscendC op computes from the bf16 values and stays finite."""
    import torch

    spec = cases.Spec(draft=4)
    width, draft, dim = spec.width, spec.draft, spec.dim
    bed = cases.build(spec, seed=11)
    original, ours = cases.functions(bed.module)
    x = bed.mixed_qkv.view(spec.batch, draft, dim)
    # In range: fp16's largest magnitudes and values below fp16's normal range.
    x[0, 0, 0], x[0, 1, 1], x[0, 2, 2] = 60000.0, -65024.0, 1e-6
    # Beyond: request 1, token 1, channel 3.
    x[1, 1, 3] = 1e5
    expected_out, expected_conv = cases.reference(bed)
    assert bool(torch.isfinite(expected_out).all())

    run = cases.run_branch(bed, ours)
    out = run.out.view(spec.batch, draft, dim)
    want = expected_out.view(spec.batch, draft, dim)
    hit = torch.zeros_like(out, dtype=torch.bool)
    hit[1, 1 : min(draft, 1 + width), 3] = True  # tokens whose window contains the value
    assert not bool(torch.isfinite(out[hit]).any()), out[hit]
    tol = cases.output_tolerance(out.dtype, want[~hit])
    assert float((out[~hit].float() - want[~hit].float()).abs().max()) <= tol
    layer = cases.LAYERS.index(cases.LAYER_ID)
    line = bed.slots[1]
    assert bool((run.conv[layer, line] == expected_conv[layer, line]).all())
    assert float(run.conv[layer, line, -draft + 1, 3]) == float(x[1, 1, 3])

    before = cases.run_branch(bed, original)
    assert bool(torch.isfinite(before.out).all())
    assert not _failed(cases.comparisons(bed, before, expected_out, expected_conv)[:1])


# --------------------------------------------------------------------------- gates


def test_later_releases_report_upstream_and_change_nothing(accel, gdn, sglang_release):
    from packaging.version import Version

    before = gdn.AscendGDNAttnBackend.__dict__["forward_extend"]
    report = _apply(accel)
    after = gdn.AscendGDNAttnBackend.__dict__["forward_extend"]
    if sglang_release >= Version(UPSTREAM_RELEASE):
        assert report.state == "upstream", report.reason
        assert after is before
    else:
        assert report.state == "applied", report.reason
        assert after is not before and after.__sgl_accel_original__ is before
        assert "causal_conv1d_update_v2 from sgl_kernel_npu" in report.reason  # the version found


@pytest.mark.parametrize("hardware", ["cpu", "cuda"])
def test_other_hardware_not_applicable(accel, sglang_release, hardware):
    from packaging.version import Version

    if sglang_release >= Version("0.5.11"):
        gdn = importlib.import_module(MODULE)  # imported, so the gates (not the import) decide
        before = gdn.AscendGDNAttnBackend.__dict__["forward_extend"]
    report = _apply(accel, hardware)
    assert report.state == "not-applicable", (report.state, report.reason)
    if sglang_release >= Version("0.5.11"):
        assert "needs ascend" in report.reason
        assert gdn.AscendGDNAttnBackend.__dict__["forward_extend"] is before
    else:
        assert "outside >=0.5.11" in report.reason


def test_missing_kernel_is_not_applicable(accel, gdn, sglang_release, monkeypatch):
    from packaging.version import Version

    if sglang_release >= Version(UPSTREAM_RELEASE):
        pytest.skip("upstream here: the kernel gate is not reached")
    before = gdn.AscendGDNAttnBackend.__dict__["forward_extend"]
    # An sgl_kernel_npu build older than #445 (no causal_conv1d_update_v2).
    monkeypatch.setitem(sys.modules, "sgl_kernel_npu.mamba.causal_conv1d", types.ModuleType("sgl_kernel_npu.mamba.causal_conv1d"))
    report = _apply(accel)
    assert report.state == "not-applicable", report.reason
    assert "causal_conv1d_update_v2 not importable" in report.reason
    assert gdn.AscendGDNAttnBackend.__dict__["forward_extend"] is before


def test_release_without_gdn_backend(accel, sglang_release):
    from packaging.version import Version

    if sglang_release >= Version("0.5.11"):
        pytest.skip("this release has the GDN backend")
    report = _apply(accel)
    assert report.state == "not-applicable", report.reason
    assert importlib.util.find_spec(MODULE) is None
