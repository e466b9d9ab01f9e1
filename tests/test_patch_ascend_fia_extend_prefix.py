"""ascend-fia-extend-prefix (upstream #22020) against the real AscendAttnBackend of each release.

0.5.10.post1 and 0.5.11: the FIA prefill branch of ``forward_extend`` attends per
request over the new tokens only. Batches of 1-4 requests (prefix 0, inside the
first page, several pages; 1 to a few hundred new tokens; GQA 1/2/4/8; head dim
64/128; page size 128; bf16 and fp32) are laid out in sglang's own ReqToTokenPool
and MHATokenToKVPool (sgl_accel.cases.ascend_fia_extend_prefix). The oracle is
computed here: causal attention over each request's prefix + new tokens with SDPA
in float64. The patched function matches it; the original misses every cached
prefix and, on batches without one, is bit-identical to the patched function
(which keeps the release's path there: same ops, same kernel calls).

0.5.12.post1 and 0.5.13.post1 carry the corrected form: the patch reports
upstream, and their own ``forward_extend`` agrees with the same oracle on the same
inputs and hands FIA the same lengths.

Ascend is emulated: SGL_ACCEL_HARDWARE=ascend for the loader and the test-bed FIA
model (sgl_accel.testing.kernels.fia) for the kernel.
"""

import importlib
import json
import os
import subprocess
import sys
from itertools import accumulate
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

NAME = "ascend-fia-extend-prefix"
RELEASE = os.environ.get("SGL_ACCEL_TEST_SGLANG") or ""
APPLIES = ("0.5.10.post1", "0.5.11")
UPSTREAM = ("0.5.12.post1", "0.5.13.post1")
BACKEND = "sglang.srt.hardware_backend.npu.attention.ascend_backend"
ROOT = Path(__file__).resolve().parents[1]

needs_per_request_form = pytest.mark.skipif(RELEASE not in APPLIES, reason="the per-request form is in 0.5.10.post1 / 0.5.11")
needs_upstream_form = pytest.mark.skipif(RELEASE not in UPSTREAM, reason="the corrected form is in 0.5.12.post1+")
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def cases():
    from sgl_accel.cases import ascend_fia_extend_prefix

    return ascend_fia_extend_prefix


def fia():
    from sgl_accel.testing.kernels import fia as module

    return module


def installed_forward_extend():
    return importlib.import_module(BACKEND).AscendAttnBackend.__dict__["forward_extend"]


@pytest.fixture
def backend_module():
    return importlib.import_module(BACKEND)


@pytest.fixture
def patched(accel, backend_module):
    """(patched, original) forward_extend, the patch applied as apply() does on Ascend."""
    import sgl_accel

    accel("ascend")
    original = installed_forward_extend()
    report = sgl_accel.apply([NAME], allow_untested=True)[NAME]
    assert report.state == "applied", report.reason
    current = installed_forward_extend()
    assert current is not original and current.__sgl_accel_original__ is original
    return current, original


# --------------------------------------------------------------------------- the oracle, computed here


def sdpa_oracle(built):
    """New-token rows of causal attention over each request's prefix + new tokens,
    float64, with an explicit lower-triangular mask and K/V heads repeated per group."""
    import torch
    import torch.nn.functional as F

    rows = []
    for (q, k, v), prefix in zip(built.sequences, built.scenario.prefix_lens):
        group = q.shape[1] // k.shape[1]
        qh = q.double().transpose(0, 1)
        kh = k.double().repeat_interleave(group, dim=1).transpose(0, 1)
        vh = v.double().repeat_interleave(group, dim=1).transpose(0, 1)
        n = q.shape[0]
        allowed = torch.ones(n, n, dtype=torch.bool).tril()
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=built.layer.scaling)
        rows.append(out.transpose(0, 1)[prefix:].reshape(n - prefix, -1))
    return torch.cat(rows)


def tolerance(built, reference):
    return cases().scaled_tolerance(reference, cases()._dtype(built.scenario.dtype))


def request_rows(scenario):
    """(start, end) rows of each request's new tokens in the batch."""
    ends = list(accumulate(int(n) for n in scenario.extend_lens))
    return list(zip([0] + ends[:-1], ends))


@st.composite
def scenarios(draw, max_bs=4):
    bs = draw(st.integers(1, max_bs))
    prefix = draw(
        st.lists(st.one_of(st.just(0), st.integers(1, 127), st.integers(128, 520)), min_size=bs, max_size=bs)
    )
    extend = draw(st.lists(st.one_of(st.integers(1, 8), st.integers(9, 300)), min_size=bs, max_size=bs))
    ratio = draw(st.sampled_from([1, 2, 4, 8]))
    kv_heads = 1 if ratio == 8 else draw(st.sampled_from([1, 2]))
    return cases().Scenario(
        prefix_lens=prefix,
        extend_lens=extend,
        num_heads=kv_heads * ratio,
        num_kv_heads=kv_heads,
        head_dim=draw(st.sampled_from([64, 128])),
        dtype=draw(st.sampled_from(["bfloat16", "float32"])),
        padding=draw(st.sampled_from([0, 0, 5])),
        seed=draw(st.integers(0, 2**16)),
    )


# --------------------------------------------------------------------------- without a release


def test_declaration():
    from sgl_accel._registry import all_patches, cases_module

    patch = all_patches()[NAME]
    assert (patch.kind, patch.upstream_pr, tuple(patch.hardware)) == ("fix", "#22020", ("ascend",))
    assert not patch.opt_in and not patch.kernels
    assert [t.key for t in patch.targets] == [f"{BACKEND}:AscendAttnBackend.forward_extend"]
    assert cases_module(NAME) == "sgl_accel.cases.ascend_fia_extend_prefix"
    doc = importlib.import_module("sgl_accel.patches.ascend_fia_extend_prefix").__doc__
    for needed in ("#22020", "0.5.12.post1", "0.5.10.post1", "0.5.11", "Drop this patch"):
        assert needed in doc


def test_static_verdicts_per_release():
    """What the scanner sees in each installed release's source (no import); the rewrite
    touches the non-MLA FIA branch only (the MLA branch keeps its per-request call)."""
    import ast

    from sgl_accel._guard import check_static
    from sgl_accel._registry import all_patches

    (target,) = all_patches()[NAME].targets
    expected = {"0.5.10.post1": "applies", "0.5.11": "applies", "0.5.12.post1": "upstream", "0.5.13.post1": "upstream"}
    for release, state in expected.items():
        root = ROOT / ".envs" / f"sglang-{release}" / "sglang"
        if not root.is_dir():
            pytest.skip(f"sglang {release} is not installed in .envs")
        verdict = check_static(target, str(root))
        assert verdict.state == state, (release, verdict.reason)
        if state != "applies":
            continue

        def layouts(tree):
            calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "npu_fused_infer_attention_score"]
            return sorted(next((k.value.value for k in c.keywords if k.arg == "input_layout"), None) or "" for c in calls)

        before, after = layouts(verdict.original), layouts(verdict.patched)
        # One paged TND call added; every call of the release (MLA branch included) still there.
        assert sorted(before + ["TND"]) == after, (release, before, after)


# --------------------------------------------------------------------------- states


@pytest.mark.sglang
@pytest.mark.parametrize("hardware", ["cpu", "cuda:sm90", "rocm:gfx942"])
def test_not_applicable_off_ascend(accel, backend_module, hardware):
    import sgl_accel

    accel(hardware)
    before = installed_forward_extend()
    report = sgl_accel.apply([NAME], allow_untested=True)[NAME]
    assert report.state == "not-applicable", report.reason
    assert installed_forward_extend() is before


@pytest.mark.sglang
def test_state_on_ascend(accel, backend_module):
    import sgl_accel

    accel("ascend")
    before = installed_forward_extend()
    report = sgl_accel.apply([NAME], allow_untested=True)[NAME]
    if RELEASE in UPSTREAM:
        assert report.state == "upstream", report.reason
        assert installed_forward_extend() is before
    else:
        assert report.state == "applied", report.reason
        assert installed_forward_extend().__sgl_accel_original__ is before
        sgl_accel.revert([NAME])
        assert installed_forward_extend() is before


@pytest.mark.sglang
@needs_per_request_form
def test_applies_under_tested_source_policy(accel, backend_module):
    """Without SGL_ACCEL_ALLOW_UNTESTED: the scanner's matrix knows these releases' target."""
    import sgl_accel

    accel("ascend")
    report = sgl_accel.apply([NAME])[NAME]
    assert report.state == "applied", report.reason


# --------------------------------------------------------------------------- the fix


@pytest.mark.sglang
@needs_per_request_form
@pytest.mark.parametrize("index", range(5))
def test_equivalence_cases(patched, index):
    case = cases().CASES[index]
    results = case.run(index)
    failed = [f"{r.what}: {r.max_abs_diff} > {r.tolerance} {r.note}" for r in results if not r.passed]
    assert results and not failed, (case.name, failed)


@pytest.mark.sglang
@needs_per_request_form
@SETTINGS
@given(scenario=scenarios())
def test_patched_matches_sdpa_and_the_original_misses_every_prefix(patched, scenario):
    import torch

    new, original = patched
    C = cases()
    built = C.build(scenario, "cpu")
    n = built.num_real_tokens
    expected = sdpa_oracle(built)
    tol = tolerance(built, expected)
    out = C.run(new, built)
    assert (out[:n].double() - expected).abs().max() <= tol
    if scenario.padding and scenario.has_prefix:
        assert torch.equal(out[n:], torch.zeros_like(out[n:]))
    before = C.run(original, built)
    for (start, end), prefix in zip(request_rows(scenario), scenario.prefix_lens):
        deviation = float((before[start:end].double() - expected[start:end]).abs().max())
        if prefix:
            assert deviation > tol, (prefix, deviation)  # the defect: the prefix is not seen
        else:
            assert deviation <= tol, deviation
    if not scenario.has_prefix:
        assert torch.equal(out[:n], before[:n])


@pytest.mark.sglang
@needs_per_request_form
def test_no_prefix_batch_does_exactly_the_release_work(patched):
    """Without a prefix the release's per-request path runs: same aten ops, same bytes,
    the same FIA calls (one BSND call per request), the same bits."""
    import torch

    from sgl_accel.testing.opcount import OpCounter

    new, original = patched
    C = cases()
    built = C.build(C.Scenario(prefix_lens=[0, 0, 0], extend_lens=[1, 70, 129], num_heads=8, num_kv_heads=2, head_dim=64), "cpu")
    C.run(original, built)  # the FIA model checks its mask template on first sight: not counted
    outputs, counters, calls = [], [], []
    for function in (new, original):
        fia().call_log.clear()
        with OpCounter() as counter:
            outputs.append(C.run(function, built))
        counters.append(counter)
        calls.append([(c["input_layout"], c["paged"], c["query_shape"]) for c in fia().call_log])
    assert torch.equal(outputs[0], outputs[1])
    assert counters[0].ops == counters[1].ops, counters[0].diff(counters[1])
    assert (counters[0].bytes_allocated, counters[0].bytes_written) == (counters[1].bytes_allocated, counters[1].bytes_written)
    assert calls[0] == calls[1] == [("BSND", False, (1, n, 8, 64)) for n in (1, 70, 129)]


def _expected_lengths(scenario):
    ends = list(accumulate(int(n) for n in scenario.extend_lens))
    kv = [int(p) + int(e) for p, e in zip(scenario.prefix_lens, scenario.extend_lens)]
    return ends, kv


@pytest.mark.sglang
@needs_per_request_form
def test_prefix_batch_makes_one_paged_call(patched):
    """The call follows the FIA reference semantics: TND with cumulative query ends,
    per-request KV lengths (prefix included), Python int lists, paged KV with the
    backend's page size, sparse_mode 3; padding rows trimmed before the call."""
    new, _ = patched
    C = cases()
    scenario = C.Scenario(prefix_lens=[300, 0, 5], extend_lens=[7, 40, 1], num_heads=4, num_kv_heads=1, head_dim=64, padding=4)
    built = C.build(scenario, "cpu")
    fia().call_log.clear()
    C.run(new, built)
    (call,) = list(fia().call_log)
    ends, kv = _expected_lengths(scenario)
    assert (call["input_layout"], call["paged"], call["sparse_mode"]) == ("TND", True, 3)
    assert call["python_int_list"] == {"actual_seq_lengths": True, "actual_seq_lengths_kv": True}
    assert call["values"] == {"actual_seq_lengths": ends, "actual_seq_lengths_kv": kv}
    assert call["query_shape"] == (ends[-1], 4, 64)
    assert built.backend.page_size == 128


@pytest.mark.sglang
@needs_per_request_form
def test_decode_batch_run_as_extend(patched):
    """DP attention runs a decode batch as EXTEND when another rank extends
    (ForwardBatch.prepare_mlp_sync_batch): one new token per request, the rest of the
    sequence cached, lengths as CPU tensors. The original attends to the new token
    alone; the patched call sees the whole sequence."""
    import torch

    new, original = patched
    C = cases()
    built = C.build(C.Scenario(prefix_lens=[40, 300, 7], extend_lens=[1, 1, 1], num_heads=4, num_kv_heads=2, head_dim=64, dtype="float32"), "cpu")
    batch = built.forward_batch
    batch.extend_seq_lens_cpu = torch.tensor(batch.extend_seq_lens_cpu)
    batch.extend_prefix_lens_cpu = torch.tensor(batch.extend_prefix_lens_cpu)
    expected = sdpa_oracle(built)
    tol = tolerance(built, expected)
    assert (C.run(new, built).double() - expected).abs().max() <= tol
    assert (C.run(original, built).double() - expected).abs().max() > tol


@pytest.mark.sglang
@needs_per_request_form
def test_apply_then_import_and_verify_emulate():
    """The SGL_ACCEL path in a fresh interpreter: the start-up hook waits for the
    backend module, patches it on import, and ``sgl-accel verify --emulate`` passes."""
    script = f"""
import importlib, json, sys
import sgl_accel
pending = sgl_accel.status([{NAME!r}])[{NAME!r}].state
from sgl_accel.testing import standins
standins.activate()
fn = importlib.import_module({BACKEND!r}).AscendAttnBackend.__dict__["forward_extend"]
state = sgl_accel.status([{NAME!r}])[{NAME!r}].state
from sgl_accel._verify import verify
(result,) = verify([{NAME!r}], emulate=True)
print(json.dumps(dict(startup="sgl_accel._startup" in sys.modules, pending=pending, state=state,
    mark=getattr(fn, "__sgl_accel_patch__", None), outcome=result.outcome, reason=result.reason,
    failed=[(c["name"], c["details"]) for c in result.cases if not c["passed"]])))
"""
    env = dict(os.environ, SGL_ACCEL=NAME, SGL_ACCEL_HARDWARE="ascend", SGL_ACCEL_ALLOW_UNTESTED="1")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["startup"] and out["pending"] == "pending-import", out
    assert out["state"] == "applied" and out["mark"] == NAME, out
    n = len(cases().CASES)
    assert out["outcome"] == "pass" and out["reason"].startswith(f"{n}/{n} "), (out["reason"], out["failed"])


@pytest.mark.sglang
@needs_per_request_form
def test_bench_case_leaves_the_process_unpatched(accel, backend_module):
    """``sgl-accel bench``'s case takes the patched function through apply()/revert()."""
    import torch

    accel("ascend")
    before = installed_forward_extend()
    (case,) = cases().BENCH
    original, patched = case.setup("cpu")
    assert installed_forward_extend() is before
    assert torch.equal(original(), patched())


# --------------------------------------------------------------------------- upstream's corrected form


@pytest.mark.sglang
@needs_upstream_form
@settings(SETTINGS, max_examples=8)
@given(scenario=scenarios())
def test_upstream_forward_extend_agrees(scenario):
    """The release's own corrected forward_extend on the same inputs: the same oracle
    holds, and FIA gets the same lengths (upstream passes them as a NumPy array and a
    tensor, the patch as Python int lists)."""
    import torch

    C = cases()
    built = C.build(scenario, "cpu")
    n = built.num_real_tokens
    expected = sdpa_oracle(built)
    fia().call_log.clear()
    out = C.run(installed_forward_extend(), built)
    assert (out[:n].double() - expected).abs().max() <= tolerance(built, expected)
    (call,) = list(fia().call_log)
    ends, kv = _expected_lengths(scenario)
    assert (call["input_layout"], call["paged"], call["sparse_mode"]) == ("TND", True, 3)
    assert call["values"] == {"actual_seq_lengths": ends, "actual_seq_lengths_kv": kv}
    if scenario.padding:
        assert torch.equal(out[n:], torch.zeros_like(out[n:]))
