"""ascend-cp-attn-batch (upstream #26705) against the real AscendAttnBackend of each release.

The broken combination (per-sequence ContextParallelMetadata of #23269 with the
scalar-reading do_cp_attn_fia) exists only in source installs between the two
upstream PRs. It is rebuilt here by handing the real 0.5.11 / 0.5.12.post1
backend metadata laid out as 0.5.13's prepare_context_parallel_metadata lays it
out (sgl_accel.cases.ascend_cp_attn_batch.build_cp_metadata). Every CP rank is
emulated; outputs are checked against causal SDPA over each whole sequence.

The backend instance is a real AscendAttnBackend made with object.__new__ (its
__init__ allocates on device "npu"), given only the attributes
init_forward_metadata and do_cp_attn_fia read (see cases.make_backend).
"""

import os
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.sglang

NAME = "ascend-cp-attn-batch"
RELEASE = os.environ.get("SGL_ACCEL_TEST_SGLANG") or ""
BACKEND = "sglang.srt.hardware_backend.npu.attention.ascend_backend"
CP_UTILS = "sglang.srt.layers.utils.cp_utils"
# Releases whose do_cp_attn_fia is the scalar (pre-#26705) form, and the one that has the fix.
SCALAR_FORM_RELEASES = ("0.5.11", "0.5.12.post1")
UPSTREAM_RELEASES = ("0.5.13.post1",)
needs_scalar_form = pytest.mark.skipif(
    RELEASE not in SCALAR_FORM_RELEASES, reason="the unfixed do_cp_attn_fia exists in 0.5.11 / 0.5.12.post1"
)

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def cases():
    from sgl_accel.cases import ascend_cp_attn_batch

    return ascend_cp_attn_batch


def fia():
    from sgl_accel.testing.kernels import fia as module

    return module


@pytest.fixture(scope="module")
def backend_module():
    import importlib

    return importlib.import_module(BACKEND)


@pytest.fixture
def patched(accel, backend_module):
    """The patch applied (force: also where the release gate would decline)."""
    import sgl_accel

    accel("ascend")
    original = backend_module.AscendAttnBackend.__dict__["do_cp_attn_fia"]
    report = sgl_accel.apply([NAME], force=True, allow_untested=True)[NAME]
    assert report.state == "applied", report.reason
    current = backend_module.AscendAttnBackend.__dict__["do_cp_attn_fia"]
    assert current is not original and current.__sgl_accel_original__ is original
    return types.SimpleNamespace(patched=current, original=original)


def run_all_ranks(function, built):
    C = cases()
    return [C.run_rank(function, built, rank) for rank in built.ranks]


def assert_matches_oracle(outs, built):
    from sgl_accel.cases import compare, tolerance_for

    tol = tolerance_for(cases()._dtype(built.scenario.dtype))
    for out, rank in zip(outs, built.ranks):
        result = compare(f"rank {rank.rank}", out, rank.expected, tol)
        assert result.passed, (built.scenario, result)


@st.composite
def batches(draw, max_bs=4):
    cp_size = draw(st.sampled_from([2, 4]))
    bs = draw(st.integers(1, max_bs))
    # 0.5.13's can_cp_split requires >= 2*cp_size extend tokens per sequence.
    extend = draw(st.lists(st.integers(2 * cp_size, 40), min_size=bs, max_size=bs))
    prefix = draw(st.lists(st.one_of(st.just(0), st.integers(1, 200)), min_size=bs, max_size=bs))
    heads, kv_heads = draw(st.sampled_from([(4, 4), (4, 2), (8, 2), (4, 1)]))
    head_dim = draw(st.sampled_from([16, 32]))
    seed = draw(st.integers(0, 2**16))
    return dict(extend_lens=extend, prefix_lens=prefix, cp_size=cp_size, num_heads=heads,
                num_kv_heads=kv_heads, head_dim=head_dim, seed=seed)


# --------------------------------------------------------------------------- states per release


def test_state_on_ascend_without_force(accel, backend_module, sglang_release):
    """Applied by structure on the releases with the scalar-reading do_cp_attn_fia (correct for both metadata forms)."""
    import sgl_accel

    accel("ascend")
    report = sgl_accel.apply([NAME], allow_untested=True)[NAME]
    if RELEASE in UPSTREAM_RELEASES:
        assert report.state == "upstream", report.reason
    elif "do_cp_attn_fia" not in backend_module.AscendAttnBackend.__dict__:
        assert report.state == "not-applicable" and "outside" in report.reason  # 0.5.10.post1: before the CP attention path
    else:
        assert report.state == "applied", report.reason
        assert backend_module.AscendAttnBackend.__dict__["do_cp_attn_fia"].__sgl_accel_patch__ == NAME
    assert sgl_accel._registry.all_patches()[NAME].gate is None


@pytest.mark.parametrize("hardware", ["cuda", "rocm:gfx942", "cpu"])
def test_not_applicable_off_ascend(accel, backend_module, hardware):
    import sgl_accel

    accel(hardware)
    report = sgl_accel.apply([NAME], allow_untested=True)[NAME]
    assert report.state == "not-applicable", report.reason
    assert "ascend" in report.reason or "outside" in report.reason


# --------------------------------------------------------------------------- the bug and the fix


@needs_scalar_form
def test_original_fails_with_per_sequence_metadata(backend_module):
    C = cases()
    built = C.build(C.Scenario(extend_lens=[10, 5], prefix_lens=[4, 0], cp_size=2, head_dim=32), "cpu")
    original = backend_module.AscendAttnBackend.__dict__["do_cp_attn_fia"]
    with pytest.raises(AttributeError, match="actual_seq_q_prev"):
        C.run_rank(original, built, built.ranks[0])


@needs_scalar_form
def test_patched_splits_at_total_q_prev_tokens(patched):
    """Here the midpoint split of the original would pair queries with the wrong sequence."""
    C = cases()
    built = C.build(C.Scenario(extend_lens=[10, 5], prefix_lens=[4, 0], cp_size=2, num_heads=8, num_kv_heads=2, head_dim=32), "cpu")
    rank0 = built.ranks[0]
    assert -(-rank0.q.shape[0] // 2) != rank0.meta.total_q_prev_tokens  # torch.chunk's split differs
    assert_matches_oracle(run_all_ranks(patched.patched, built), built)


@needs_scalar_form
@SETTINGS
@given(spec=batches())
def test_patched_equals_causal_attention_per_sequence(patched, spec):
    C = cases()
    built = C.build(C.Scenario(**spec), "cpu")
    outs = run_all_ranks(patched.patched, built)
    assert_matches_oracle(outs, built)
    # Together the ranks own every extend token exactly once.
    owned = sorted(i for rank in built.ranks for i in rank.local_index.tolist())
    assert owned == list(range(sum(spec["extend_lens"])))


@needs_scalar_form
@settings(SETTINGS, max_examples=15)
@given(spec=batches(max_bs=1), dtype=st.sampled_from(["float32", "bfloat16"]))
def test_scalar_batch1_patched_equals_original(patched, spec, dtype):
    import torch

    C = cases()
    built = C.build(C.Scenario(form="scalar", dtype=dtype, **spec), "cpu")
    log = fia().call_log
    log.clear()
    outs = run_all_ranks(patched.patched, built)
    patched_calls = [dict(c["values"]) for c in log]
    log.clear()
    refs = run_all_ranks(patched.original, built)
    original_calls = [dict(c["values"]) for c in log]
    for out, ref in zip(outs, refs):
        assert torch.equal(out, ref)
    assert patched_calls == original_calls and len(patched_calls) == 2 * spec["cp_size"]
    assert_matches_oracle(refs, built)


@needs_scalar_form
def test_lengths_reach_the_kernel_as_python_int_lists(patched):
    import numpy as np
    import torch

    C = cases()
    built = C.build(C.Scenario(extend_lens=[9, 30, 13], prefix_lens=[0, 140, 5], cp_size=2, head_dim=32), "cpu")
    F = fia()
    for rank in built.ranks:
        meta = rank.meta
        # Metadata lists holding numpy or tensor integers still reach the op as Python ints.
        meta.actual_seq_q_prev_list = np.array(meta.actual_seq_q_prev_list)
        meta.kv_len_next_list = torch.tensor(meta.kv_len_next_list)
        F.call_log.clear()
        C.run_rank(patched.patched, built, rank)
        prev, nxt = list(F.call_log)
        for call in (prev, nxt):
            assert call["python_int_list"] == {"actual_seq_lengths": True, "actual_seq_lengths_kv": True}, call
        cum_prev = np.cumsum(meta.actual_seq_q_prev_list).tolist()
        cum_next = np.cumsum(meta.actual_seq_q_next_list).tolist()
        assert prev["values"] == {"actual_seq_lengths": cum_prev, "actual_seq_lengths_kv": list(meta.kv_len_prev_list)}
        assert nxt["values"] == {"actual_seq_lengths": cum_next, "actual_seq_lengths_kv": meta.kv_len_next_list.tolist()}
        assert prev["query_shape"][0] == meta.total_q_prev_tokens


@needs_scalar_form
def test_inconsistent_metadata_is_refused(patched):
    C = cases()
    built = C.build(C.Scenario(extend_lens=[9, 12], prefix_lens=[0, 0], cp_size=2, head_dim=32), "cpu")
    rank = built.ranks[1]
    rank.meta.total_q_prev_tokens += 1
    with pytest.raises(ValueError, match="total_q_prev_tokens"):
        C.run_rank(patched.patched, built, rank)


@needs_scalar_form
@pytest.mark.parametrize("index", range(5))
def test_equivalence_cases(patched, index):
    case = cases().CASES[index]
    failed = [c for c in case.run(index) if not c.passed]
    assert not failed, (case.name, failed)


# --------------------------------------------------------------------------- the harness itself


def _no_round_robin(monkeypatch):
    """The zigzag (in-seq-split) CP mode, without global server args."""
    for module, name in (
        ("sglang.srt.layers.attention.nsa.utils", "is_nsa_prefill_cp_round_robin_split"),
        ("sglang.srt.layers.attention.dsa.utils", "is_dsa_prefill_cp_round_robin_split"),
        ("sglang.srt.layers.attention.dsa.utils", "is_dsa_enable_prefill_cp"),
        ("sglang.srt.layers.attention.nsa.utils", "is_nsa_enable_prefill_cp"),
    ):
        try:
            import importlib

            mod = importlib.import_module(module)
        except ImportError:
            continue
        if hasattr(mod, name):
            monkeypatch.setattr(mod, name, lambda: False)


@pytest.mark.skipif(RELEASE == "0.5.10.post1", reason="no context-parallel split in 0.5.10.post1")
def test_local_tokens_match_sglang_split(monkeypatch, backend_module):
    """The builder's zigzag layout is what sglang's own cp_split_and_rebuild_data produces."""
    import importlib

    import torch

    _no_round_robin(monkeypatch)
    C = cases()
    split = importlib.import_module(CP_UTILS).cp_split_and_rebuild_data
    for extend, cp in (([10, 5], 2), ([33, 8, 17, 9], 4), ([61], 4)):
        tokens = torch.arange(sum(extend))[:, None]
        for rank in range(cp):
            meta = C.build_cp_metadata(extend, [0] * len(extend), rank, cp)
            got = split(types.SimpleNamespace(attn_cp_metadata=meta), tokens).flatten()
            assert torch.equal(got, C.local_token_index(meta))


@pytest.mark.skipif(RELEASE not in UPSTREAM_RELEASES, reason="prepare_context_parallel_metadata is per-sequence from 0.5.13")
def test_builder_matches_upstream_metadata(monkeypatch):
    import importlib

    import torch

    _no_round_robin(monkeypatch)
    C = cases()
    prepare = importlib.import_module(CP_UTILS).prepare_context_parallel_metadata
    for extend, prefix, cp in (([10, 5], [4, 0], 2), ([33, 8, 17, 9], [0, 200, 3, 127], 4), ([61], [7], 2)):
        seqs = [p + e for p, e in zip(prefix, extend)]
        for rank in range(cp):
            real = prepare(sum(extend), rank, cp, seqs, extend_seqs_len=extend, device="cpu")
            mine = C.build_cp_metadata(extend, prefix, rank, cp)
            for field in vars(mine):
                a, b = getattr(mine, field), getattr(real, field)
                same = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                assert same, (field, a, b)


@pytest.mark.skipif(RELEASE not in UPSTREAM_RELEASES, reason="the fixed do_cp_attn_fia is in 0.5.13")
def test_upstream_function_matches_oracle(accel, backend_module, monkeypatch):
    """Control: upstream's own fixed function with upstream's own metadata agrees with the oracle."""
    import importlib

    _no_round_robin(monkeypatch)
    C = cases()
    prepare = importlib.import_module(CP_UTILS).prepare_context_parallel_metadata
    extend, prefix, cp = [12, 30, 9], [0, 150, 3], 2
    built = C.build(C.Scenario(extend_lens=extend, prefix_lens=prefix, cp_size=cp, num_heads=8, num_kv_heads=2, head_dim=32), "cpu")
    seqs = [p + e for p, e in zip(prefix, extend)]
    upstream = backend_module.AscendAttnBackend.__dict__["do_cp_attn_fia"]
    for rank in built.ranks:
        rank.forward_batch.attn_cp_metadata = prepare(sum(extend), rank.rank, cp, seqs, extend_seqs_len=extend, device="cpu")
    fia().call_log.clear()
    assert_matches_oracle(run_all_ranks(upstream, built), built)
    # The merged upstream converts np.cumsum's result with .tolist() (its second commit).
    assert all(all(c["python_int_list"].values()) for c in fia().call_log) and len(fia().call_log) == 2 * cp
