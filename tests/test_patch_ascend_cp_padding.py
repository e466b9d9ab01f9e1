"""ascend-cp-padding on the real release functions (in-process; the end-to-end check across CP
ranks is tests/test_cp_prefill_multiprocess.py).

The release's ``prepare_context_parallel_metadata`` makes its tensors on device "cuda" (mapped
to the NPU by torch_npu's transfer_to_npu on Ascend); here the ``cuda_is_cpu`` fixture maps it
to the CPU the same way for the release and the patched builder.
"""

import dataclasses
import importlib
import os
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.sglang

NAME = "ascend-cp-padding"
RELEASE = os.environ.get("SGL_ACCEL_TEST_SGLANG") or ""
CP_UTILS = "sglang.srt.layers.utils.cp_utils"
BACKEND = "sglang.srt.hardware_backend.npu.attention.ascend_backend"
QWEN3 = "sglang.srt.models.qwen3_moe"
FIXED_RELEASES = ("0.5.11", "0.5.12.post1")
needs_release_builder = pytest.mark.skipif(RELEASE not in FIXED_RELEASES, reason="the scalar builder is in 0.5.11 / 0.5.12.post1")
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def cuda_is_cpu(monkeypatch):
    import torch

    real = torch.tensor

    def tensor(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", tensor)


@pytest.fixture
def zigzag_cp(monkeypatch):
    """Server args of zigzag prefill CP (no NSA) for the functions that read them."""
    from sglang.srt import server_args

    from sgl_accel.cases.ascend_cp_padding import server_args_for_cp

    monkeypatch.setattr(server_args, "_global_server_args", server_args_for_cp(2))


@pytest.fixture
def patched(accel):
    import sgl_accel

    for module in (CP_UTILS, BACKEND, QWEN3):
        importlib.import_module(module)
    accel("ascend")
    release = importlib.import_module(CP_UTILS).prepare_context_parallel_metadata
    report = sgl_accel.apply([NAME], allow_untested=True)[NAME]
    assert report.state == "applied", report.reason
    return types.SimpleNamespace(release=release, patched=importlib.import_module(CP_UTILS).prepare_context_parallel_metadata)


def same(a, b):
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return type(a) is type(b) and a == b


def release_fields(meta_class):
    return [f.name for f in dataclasses.fields(meta_class)]


# --------------------------------------------------------------------------- states


def test_states(accel, sglang_release):
    import sgl_accel

    for module in (CP_UTILS, BACKEND, QWEN3):
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    accel("ascend")
    report = sgl_accel.apply([NAME], allow_untested=True)[NAME]
    if RELEASE in FIXED_RELEASES:
        assert report.state == "applied" and report.parts == {"cp-metadata": "applied", "block-table": "applied"}, report
    elif RELEASE == "0.5.13.post1":
        # #23269 fixed the prefix; the block table is still sized without the padding.
        assert report.state == "applied" and report.parts == {"cp-metadata": "upstream", "block-table": "applied"}, report
    else:
        assert report.state == "not-applicable", report


@pytest.mark.parametrize("hardware", ["cuda", "cpu"])
def test_not_applicable_off_ascend(accel, hardware):
    import sgl_accel

    accel(hardware)
    assert sgl_accel.apply([NAME], allow_untested=True)[NAME].state == "not-applicable"


# --------------------------------------------------------------------------- defect 1: the prefix


@needs_release_builder
def test_release_prefix_is_short_by_the_padding(cuda_is_cpu, zigzag_cp):
    """The release, one sequence with a 5-token cached prefix, 30 extend tokens padded by 2."""
    prepare = importlib.import_module(CP_UTILS).prepare_context_parallel_metadata
    prefix, extend, pad, cp = 5, 30, 2, 2
    for rank in range(cp):
        meta = prepare(extend + pad, rank, cp, [prefix + extend])
        blocks = meta.split_list
        assert meta.kv_len_prev == (prefix - pad) + sum(blocks[: rank + 1])  # not prefix + ...


@needs_release_builder
def test_patched_prefix_is_the_real_one(patched, cuda_is_cpu, zigzag_cp):
    prefix, extend, pad, cp = 5, 30, 2, 2
    for rank in range(cp):
        meta = patched.patched(extend + pad, rank, cp, [prefix + extend], extend_seqs_len=[extend])
        blocks = meta.split_list
        assert sum(blocks) == extend + pad  # the padding is the tail of the (last) sequence
        assert meta.kv_len_prev == prefix + sum(blocks[: rank + 1])
        assert meta.kv_len_next == prefix + sum(blocks[: 2 * cp - rank])
        assert meta.kv_len_prev_list == [meta.kv_len_prev] and meta.total_q_prev_tokens == meta.actual_seq_q_prev


# --------------------------------------------------------------------------- item 3: identical elsewhere


@needs_release_builder
@SETTINGS
@given(
    cp=st.sampled_from([2, 4]),
    extend=st.integers(4, 700),
    amount=st.integers(1, 300),
    case=st.sampled_from(["prefix, no padding", "padding, no prefix", "neither"]),
    with_extend=st.booleans(),
)
def test_one_sequence_metadata_equals_the_release(patched, cuda_is_cpu, zigzag_cp, cp, extend, amount, case, with_extend):
    """Field by field the release's metadata wherever the defect does not occur (no prefix, or no padding)."""
    prefix = amount if case == "prefix, no padding" else 0
    pad = amount % (2 * cp) if case == "padding, no prefix" else 0
    total = extend + pad
    if total // (2 * cp) == 0:
        return
    seqs = [prefix + extend]
    for rank in range(cp):
        ref = patched.release(total, rank, cp, seqs)
        got = patched.patched(total, rank, cp, seqs, extend_seqs_len=[extend]) if with_extend else patched.patched(total, rank, cp, seqs)
        assert isinstance(got, type(ref))
        for name in release_fields(type(ref)):
            assert same(getattr(got, name), getattr(ref, name)), (name, getattr(got, name), getattr(ref, name))


@needs_release_builder
def test_several_sequences_layout(patched, cuda_is_cpu, zigzag_cp):
    """Per-sequence fields, scalar fields unset (-1) for several sequences, and the layout sglang's split uses."""
    import torch

    from sgl_accel.cases.ascend_cp_attn_batch import build_cp_metadata, local_token_index

    cp_utils = importlib.import_module(CP_UTILS)
    extend, prefix, cp = [10, 5, 33], [4, 0, 130], 2
    for rank in range(cp):
        got = patched.patched(sum(extend), rank, cp, [p + e for p, e in zip(prefix, extend)], extend_seqs_len=extend, device="cpu")
        want = build_cp_metadata(extend, prefix, rank, cp)  # the layout of upstream #23269, built independently
        for name in vars(want):
            a, b = getattr(got, name), getattr(want, name)
            assert (torch.equal(a, b) if isinstance(b, torch.Tensor) else a == b), (name, a, b)
        assert got.kv_len_prev == got.actual_seq_q_prev == -1
        tokens = torch.arange(sum(extend))[:, None]
        split = cp_utils.cp_split_and_rebuild_data(types.SimpleNamespace(attn_cp_metadata=got), tokens).flatten()
        assert torch.equal(split, local_token_index(want))


# --------------------------------------------------------------------------- defect 2: block table


def _block_table(backend_module, seq_lens, extend, padded_tokens, cp_size, page=128):
    import torch

    from sgl_accel.cases.ascend_cp_attn_batch import make_backend

    fb_mod = importlib.import_module("sglang.srt.model_executor.forward_batch_info")
    req_to_token = torch.arange(4 * 1024, dtype=torch.int32).reshape(4, 1024)
    backend = make_backend(page, req_to_token)
    backend.attn_cp_size = cp_size
    seq = torch.tensor(seq_lens)
    batch = types.SimpleNamespace(
        forward_mode=fb_mod.ForwardMode.EXTEND, seq_lens=seq, seq_lens_cpu=seq, req_pool_indices=torch.arange(len(seq_lens)),
        req_to_token_pool=backend.req_to_token_pool, extend_seq_lens=torch.tensor(extend), extend_seq_lens_cpu=list(extend),
        extend_prefix_lens=seq - torch.tensor(extend), extend_prefix_lens_cpu=(seq - torch.tensor(extend)).tolist(),
        input_ids=torch.zeros(padded_tokens, dtype=torch.int64), spec_info=None,
    )
    backend.init_forward_metadata(batch)
    return backend.forward_metadata.block_tables


@pytest.mark.skipif(RELEASE not in FIXED_RELEASES + ("0.5.13.post1",), reason="Ascend CP prefill from 0.5.11")
def test_block_table_covers_the_padding(accel):
    import torch

    import sgl_accel

    backend_module = importlib.import_module(BACKEND)
    # Last sequence 127 tokens (1 prefix + 126 extend) and 2 padding tokens: its KV range is 129.
    args = ([40, 127], [40, 126], 40 + 126 + 2)
    before = _block_table(backend_module, *args, cp_size=2)
    assert before.shape[1] * 128 < 127 + 2  # the release's table stops at 128 tokens
    no_cp = _block_table(backend_module, *args, cp_size=1)
    no_pad = _block_table(backend_module, [40, 127], [40, 126], 166, cp_size=2)
    accel("ascend")
    assert sgl_accel.apply([NAME], allow_untested=True)[NAME].state == "applied"
    after = _block_table(backend_module, *args, cp_size=2)
    assert after.shape[1] * 128 >= 127 + 2 and torch.equal(after[:, : before.shape[1]], before)
    # Unchanged without CP or without padding.
    assert torch.equal(_block_table(backend_module, *args, cp_size=1), no_cp)
    assert torch.equal(_block_table(backend_module, [40, 127], [40, 126], 166, cp_size=2), no_pad)


@needs_release_builder
@pytest.mark.parametrize("index", range(3))
def test_equivalence_cases(patched, index):
    from sgl_accel.cases import ascend_cp_padding

    case = ascend_cp_padding.CASES[index]
    results = case.run(index)
    assert results and all(c.passed for c in results), (case.name, [c for c in results if not c.passed])
