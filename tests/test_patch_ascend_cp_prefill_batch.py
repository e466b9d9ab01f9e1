"""ascend-cp-prefill-batch (opt-in): the scheduler's admission and the model's split decision,
on the real ``PrefillAdder.add_one_req`` and ``can_cp_split`` of the releases.

The PrefillAdder is the real class; its tree cache, KV allocator and requests are plain
objects with the few attributes add_one_req reads (a large free pool, no radix tree).
"""

import importlib
import os
import types

import pytest

pytestmark = pytest.mark.sglang

NAME = "ascend-cp-prefill-batch"
NEEDED = ["ascend-cp-padding", "ascend-cp-attn-batch"]
RELEASE = os.environ.get("SGL_ACCEL_TEST_SGLANG") or ""
BATCHING_RELEASES = ("0.5.11", "0.5.12.post1")
POLICY = "sglang.srt.managers.schedule_policy"
CP_UTILS = "sglang.srt.layers.utils.cp_utils"
MODULES = (POLICY, CP_UTILS, "sglang.srt.hardware_backend.npu.attention.ascend_backend", "sglang.srt.models.qwen3_moe")
needs_batching_release = pytest.mark.skipif(RELEASE not in BATCHING_RELEASES, reason="batched CP prefill is upstream from 0.5.13")
CP = 2


@pytest.fixture
def zigzag_cp(monkeypatch):
    from sglang.srt import server_args

    from sgl_accel.cases.ascend_cp_padding import server_args_for_cp

    args = server_args_for_cp(CP)
    monkeypatch.setattr(server_args, "_global_server_args", args)
    return args


@pytest.fixture
def modules():
    return [importlib.import_module(m) for m in MODULES]


def apply(names):
    import sgl_accel

    report = sgl_accel.apply(names, allow_untested=True)
    return {p.name: p.state for p in report}


# --------------------------------------------------------------------------- opt-in


def test_opt_in_is_applied_only_when_named(accel, modules, monkeypatch):
    import sgl_accel
    from sgl_accel._config import read
    from sgl_accel._registry import all_patches, default_names

    assert all_patches()[NAME].opt_in and NAME not in default_names()
    accel("ascend")
    monkeypatch.setenv("SGL_ACCEL", "1")
    assert NAME not in read(default_on=False).patches
    monkeypatch.setenv("SGL_ACCEL", f"ascend-cp-padding,{NAME}")
    assert NAME in read(default_on=False).patches
    report = sgl_accel.apply(allow_untested=True)
    assert NAME not in [p.name for p in report]
    state = apply([NAME])[NAME]
    assert state == ("applied" if RELEASE in BATCHING_RELEASES else "upstream" if RELEASE == "0.5.13.post1" else "not-applicable")


# --------------------------------------------------------------------------- the scheduler


class _Pool:
    def available_size(self):
        return 1 << 20


class _Cache:
    disable = False

    def supports_mamba(self):
        return False

    def supports_swa(self):
        return False

    def is_tree_cache(self):
        return False

    def evictable_size(self):
        return 0

    def inc_lock_ref(self, node):
        return None

    def dec_lock_ref(self, node, *args):
        return None


def _request(extend):
    import torch

    req = types.SimpleNamespace(
        sampling_params=types.SimpleNamespace(max_new_tokens=8, ignore_eos=False),
        output_ids=[], extend_input_len=extend, host_hit_length=0, prefix_indices=torch.empty(0, dtype=torch.int64),
        last_node=None, fill_ids=list(range(extend)),
    )
    req.set_extend_input_len = lambda n: setattr(req, "extend_input_len", n)
    return req


def admitted(extends, rem_chunk_tokens=None):
    """How many of the requests one PrefillAdder takes into a CP prefill batch."""
    policy = importlib.import_module(POLICY)
    adder = policy.PrefillAdder(
        page_size=128, tree_cache=_Cache(), token_to_kv_pool_allocator=_Pool(), running_batch=None,
        new_token_ratio=1.0, rem_input_tokens=1 << 16, rem_chunk_tokens=rem_chunk_tokens,
    )
    assert adder.prefill_context_parallel_enabled
    for extend in extends:
        if adder.add_one_req(_request(extend), has_chunked_req=False, truncation_align_size=None) != policy.AddReqResult.CONTINUE:
            break
    return len(adder.can_run_list)


@needs_batching_release
def test_scheduler_admits_several_only_when_opted_in_and_all_qualify(accel, modules, zigzag_cp):
    accel("ascend")
    qualifying = [300, 2 * CP, 1000]
    assert admitted(qualifying) == 1  # the release: one request per CP prefill batch

    assert apply([NAME]) == {NAME: "applied"}
    assert admitted(qualifying) == 1  # the opt-in alone: its per-sequence pieces are missing

    assert apply(NEEDED) == {n: "applied" for n in NEEDED}
    assert admitted(qualifying) == 3
    assert admitted([300, 2 * CP - 1, 1000]) == 1  # a short request stops the batch
    assert admitted([2 * CP - 1, 300]) == 1  # a short first request keeps the batch at one
    assert admitted([300, 200], rem_chunk_tokens=300 + 128 + 2) == 1  # the second would be chunked to 0 tokens
    zigzag_cp.enable_mixed_chunk = True
    assert admitted(qualifying) == 1  # mixed batches are not split


# --------------------------------------------------------------------------- the split decision


def _batch(extend, mode="EXTEND"):
    import torch

    fb_mod = importlib.import_module("sglang.srt.model_executor.forward_batch_info")
    seq = torch.tensor([e + 3 for e in extend])
    return types.SimpleNamespace(forward_mode=getattr(fb_mod.ForwardMode, mode), seq_lens_cpu=seq, extend_seq_lens_cpu=list(extend))


@needs_batching_release
def test_can_cp_split(accel, modules, zigzag_cp):
    cp_utils = importlib.import_module(CP_UTILS)
    cases = [([40], "EXTEND"), ([3], "EXTEND"), ([40], "MIXED"), ([40, 9, 4], "EXTEND"), ([40, 3], "EXTEND"), ([40, 9], "MIXED")]
    release = [cp_utils.can_cp_split(sum(e), CP, _batch(e, m)) for e, m in cases]
    assert release == [True, False, True, False, False, False]  # one sequence only

    accel("ascend")
    apply([NAME])
    assert [cp_utils.can_cp_split(sum(e), CP, _batch(e, m)) for e, m in cases] == release  # pieces missing
    apply(NEEDED)
    got = [cp_utils.can_cp_split(sum(e), CP, _batch(e, m)) for e, m in cases]
    assert got[:3] == release[:3]  # one sequence: exactly the release
    assert got[3:] == [True, False, False]  # several: each must have 2*cp tokens, never MIXED


@needs_batching_release
@pytest.mark.parametrize("with_pieces", [False, True])
def test_equivalence_cases(accel, modules, with_pieces):
    from sgl_accel.cases import ascend_cp_prefill_batch

    accel("ascend")
    apply([NAME] + (NEEDED if with_pieces else []))
    for case in ascend_cp_prefill_batch.CASES:
        results = case.run(0)
        assert results and all(c.passed for c in results), (case.name, [c for c in results if not c.passed])
