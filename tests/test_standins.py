"""Import stand-ins: real sglang modules import; placeholders fail loudly; the wired
kernels reach sgl_accel.testing.kernels; activate() refuses next to a real torch_npu;
the ROCm NSA decode capture point and its reference attention."""

import importlib
import importlib.util
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from sgl_accel.testing import standins
from sgl_accel.testing.kernels import rocm
from sgl_accel.testing.opcount import OpCounter

# (module, first release that has it, last release where it is expected to import)
MODULES = [
    ("sglang.srt.hardware_backend.npu.attention.ascend_backend", "0.5.10.post1", None),
    ("sglang.srt.hardware_backend.npu.attention.ascend_gdn_backend", "0.5.11", None),
    ("sglang.srt.models.dflash", "0.5.11", None),
    ("sglang.srt.speculative.dflash_worker", "0.5.11", None),
    # 0.5.13.post1's nsa_backend shim is broken upstream: see test_nsa_backend_shim.
    ("sglang.srt.layers.attention.nsa_backend", "0.5.10.post1", "0.5.12.post1"),
    ("sglang.srt.layers.attention.dsa_backend", "0.5.13", None),
    ("sglang.srt.layers.attention.nsa.nsa_indexer", "0.5.10.post1", None),
    ("sglang.srt.layers.attention.dsa.dsa_indexer", "0.5.13", None),
    ("sglang.srt.models.deepseek_common.attention_forward_methods.forward_mla", "0.5.10.post1", None),
    ("sglang.srt.hardware_backend.npu.graph_runner.npu_graph_runner", "0.5.10.post1", None),
    ("sglang.srt.layers.utils.cp_utils", "0.5.10.post1", None),
    ("sglang.srt.plugins", "0.5.11", None),
]


# ---------------------------------------------------------------------------
# With a release


@pytest.mark.sglang
@pytest.mark.parametrize("module,since,until", MODULES, ids=[m[0].rsplit(".", 2)[-1] for m in MODULES])
def test_real_sglang_module_imports(sglang_release, module, since, until):
    from packaging.version import Version

    if sglang_release < Version(since) or (until and sglang_release > Version(until)):
        pytest.skip(f"{module} is not expected to import in {sglang_release}")
    mod = importlib.import_module(module)
    assert mod.__file__.startswith(str(sys.modules["sglang"].__path__[0]))


@pytest.mark.sglang
def test_stand_ins_do_not_fake_a_device(sglang_release):
    importlib.import_module("sglang.srt.hardware_backend.npu.attention.ascend_backend")
    from sglang.srt.utils import is_cuda, is_hip, is_npu

    assert not hasattr(torch, "npu")
    assert (is_npu(), is_hip(), is_cuda()) == (False, False, False)


@pytest.mark.sglang
def test_sglang_sees_the_wired_kernels(sglang_release):
    from packaging.version import Version

    ab = importlib.import_module("sglang.srt.hardware_backend.npu.attention.ascend_backend")
    assert ab.torch_npu.npu_fused_infer_attention_score is torch.ops.npu.npu_fused_infer_attention_score
    if sglang_release >= Version("0.5.12"):
        gdn = importlib.import_module("sglang.srt.hardware_backend.npu.attention.ascend_gdn_backend")
        assert getattr(gdn.causal_conv1d_update_v2, standins.MARKER, False)


@pytest.mark.sglang
def test_nsa_backend_shim(sglang_release):
    """0.5.13.post1 renamed NSA to DSA; its nsa_backend shim re-exports
    NativeSparseAttnBackend, which dsa_backend no longer defines (upstream bug)."""
    from packaging.version import Version

    if sglang_release < Version("0.5.13"):
        pytest.skip("nsa_backend is the real module before 0.5.13")
    dsa = importlib.import_module("sglang.srt.layers.attention.dsa_backend")
    if hasattr(dsa, "NativeSparseAttnBackend"):
        importlib.import_module("sglang.srt.layers.attention.nsa_backend")
    else:
        with pytest.raises(ImportError, match="NativeSparseAttnBackend"):
            importlib.import_module("sglang.srt.layers.attention.nsa_backend")


def _backend_class(release):
    from packaging.version import Version

    if release >= Version("0.5.13"):
        return importlib.import_module("sglang.srt.layers.attention.dsa_backend").DeepseekSparseAttnBackend
    return importlib.import_module("sglang.srt.layers.attention.nsa_backend").NativeSparseAttnBackend


@pytest.mark.sglang
def test_recorder_captures_real_tilelang_decode_call(sglang_release):
    cls = _backend_class(sglang_release)
    g = torch.Generator().manual_seed(0)
    T, H, D, d_v, N, K = 3, 4, 40, 32, 20, 6
    q_all = torch.randn(T, H, D, generator=g)
    kv = torch.randn(N, 1, D, generator=g)
    page_table_1 = torch.randint(0, N, (T, K), generator=g)
    page_table_1[1, 3:] = -1
    tilelang = cls.__module__.rsplit(".", 1)[0] + (".dsa" if ".dsa_backend" in cls.__module__ else ".nsa") + ".tilelang_kernel"
    before = sys.modules.get(tilelang)
    rec = rocm.DecodeRecorder()
    with rec.installed(cls):
        out = cls._forward_tilelang(None, q_all=q_all, kv_cache=kv, v_head_dim=d_v,
                                    page_table_1=page_table_1, sm_scale=0.1)
    [call] = rec.decode_calls
    assert call.q is q_all and call.args["indices"].shape == (T, 1, K)
    torch.testing.assert_close(out, _oracle(q_all, kv, page_table_1, 0.1, d_v).float(), rtol=1e-5, atol=1e-5)
    # Restored: the capture module is gone, the backend has no aiter names again.
    assert sys.modules.get(tilelang) is before
    assert not hasattr(sys.modules[cls.__module__], "mla_decode_fwd")


# ---------------------------------------------------------------------------
# Release-free


def test_placeholder_raises_loudly_when_called(standins_active):
    import sgl_kernel

    with pytest.raises(standins.StandInNotImplemented, match=r"sgl_kernel\.flash_mla\.flash_mla_with_kvcache"):
        from sgl_kernel.flash_mla import flash_mla_with_kvcache

        flash_mla_with_kvcache(torch.zeros(1))
    with pytest.raises(standins.StandInNotImplemented, match=r"torch_npu\.npu_rms_norm"):
        import torch_npu

        torch_npu.npu_rms_norm(torch.zeros(2), torch.ones(2))
    assert getattr(sgl_kernel, standins.MARKER)


def test_placeholder_import_time_uses(standins_active):
    from aiter import ActivationType
    from flashinfer.decode import BatchDecodeWithPagedKVCacheWrapper
    from torch_npu.contrib import transfer_to_npu  # noqa: F401

    # attribute chains, hashing, repr
    table = {ActivationType.Silu: "silu"}
    assert table[ActivationType.Silu] == "silu"
    assert ActivationType.Silu is ActivationType.Silu
    assert "aiter.ActivationType.Silu" in repr(ActivationType.Silu)
    assert not hasattr(ActivationType, "__wrapped__")
    assert standins.is_placeholder(ActivationType)

    # subclassing works; constructing through the stand-in base refuses
    class Wrapper(BatchDecodeWithPagedKVCacheWrapper):
        pass

    with pytest.raises(standins.StandInNotImplemented, match="BatchDecodeWithPagedKVCacheWrapper"):
        Wrapper()

    # any submodule imports; the package answers find_spec like an installed one
    mod = importlib.import_module("sgl_kernel_npu.some.deep.module")
    assert getattr(mod, standins.MARKER)
    assert importlib.util.find_spec("torchvision.io") is not None
    # but no NPU device appears
    assert not hasattr(torch, "npu")


def test_activate_is_idempotent(standins_active):
    n = sum(isinstance(f, standins._StandInFinder) for f in sys.meta_path)
    standins.activate()
    assert standins.is_active()
    assert sum(isinstance(f, standins._StandInFinder) for f in sys.meta_path) == n == 1


def _fake_kernel_module(monkeypatch, name, **functions):
    mod = types.ModuleType(f"sgl_accel.testing.kernels.{name}")
    for key, fn in functions.items():
        setattr(mod, key, fn)
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return mod


def test_conv1d_op_is_a_real_op_mutating_conv_state(standins_active, monkeypatch):
    seen = {}

    def ascendc(x, weight, conv_state, conv_state_indices, bias=None, num_accepted_tokens=None,
                query_start_loc=None, activation_mode=False, pad_slot_id=-1):
        seen.update(conv_state=conv_state, activation_mode=activation_mode, pad_slot_id=pad_slot_id,
                    num_accepted_tokens=num_accepted_tokens)
        conv_state[conv_state_indices.long()] += 1
        return x * 2

    _fake_kernel_module(monkeypatch, "conv1d", causal_conv1d_update_ascendc=ascendc)
    schema = torch.ops.npu.causal_conv1d_update.default._schema
    assert schema.arguments[2].name == "conv_state" and schema.arguments[2].alias_info.is_write
    x = torch.randn(2, 3, 8)
    state = torch.zeros(4, 5, 8)
    idx = torch.tensor([1, 3], dtype=torch.int32)
    acc = torch.full((2,), 3, dtype=torch.int32)
    weight = torch.randn(4, 8)
    with OpCounter() as c:
        y = torch.ops.npu.causal_conv1d_update(x, weight, state, idx, None, acc, None, True, -1)
    assert dict(c.ops) == {"npu.causal_conv1d_update.default": 1}
    assert torch.equal(y, x * 2)
    # the declared in-place state counts as written by the op
    assert c.bytes_written == y.numel() * 4 + state.numel() * 4 and c.allocations == 1
    assert state[[1, 3]].eq(1).all() and state[[0, 2]].eq(0).all()
    assert seen["conv_state"].data_ptr() == state.data_ptr()
    assert seen["activation_mode"] is True and seen["pad_slot_id"] == -1
    assert torch.equal(seen["num_accepted_tokens"], acc)


def test_fia_wiring_passes_arguments_through(standins_active, monkeypatch):
    received = []

    def record(tag, result):
        def fn(*args, **kwargs):
            received.append((tag, args, kwargs))
            return result

        return fn

    _fake_kernel_module(
        monkeypatch, "fia",
        npu_fused_infer_attention_score=record("fia", ("out", "lse")),
        npu_fused_infer_attention_score_out=record("fia.out", None),
        get_max_workspace=record("ws", "workspace"),
    )
    import numpy as np
    import torch_npu

    # both spellings sglang uses reach the same reference
    assert torch.ops.npu.npu_fused_infer_attention_score is torch_npu.npu_fused_infer_attention_score
    q, k, v = torch.randn(4, 2, 8), torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    lens = np.cumsum([1, 3])  # must arrive as the numpy array the caller built
    assert torch.ops.npu.npu_fused_infer_attention_score(
        q, k, v, num_heads=2, input_layout="TND", actual_seq_lengths=lens, sparse_mode=3
    ) == ("out", "lse")
    tag, args, kwargs = received[-1]
    assert tag == "fia" and args[0] is q and args[2] is v
    assert kwargs["actual_seq_lengths"] is lens and kwargs["input_layout"] == "TND"

    # graph-mode spelling: workspace + .out
    assert torch_npu._npu_fused_infer_attention_score_get_max_workspace(q, k, v, num_heads=2) == "workspace"
    bufs = [torch.empty_like(q), torch.empty(1)]
    torch_npu.npu_fused_infer_attention_score.out(q, k, v, num_heads=2, workspace="workspace", out=bufs)
    assert received[-2][0] == "ws"
    tag, args, kwargs = received[-1]
    assert tag == "fia.out" and kwargs["out"] is bufs and kwargs["workspace"] == "workspace"


def test_python_kernels_forward_lazily(standins_active, monkeypatch):
    calls = []
    _fake_kernel_module(monkeypatch, "conv1d", causal_conv1d_update_v2=lambda *a, **k: calls.append(("v2", a, k)) or "v2")
    _fake_kernel_module(monkeypatch, "split_qkv", split_qkv_rmsnorm_rope=lambda *a, **k: calls.append(("qkv", a, k)) or "qkv")
    from sgl_kernel_npu.mamba.causal_conv1d import causal_conv1d_update_v2
    from sgl_kernel_npu.norm.split_qkv_rmsnorm_rope import split_qkv_rmsnorm_rope

    assert causal_conv1d_update_v2(1, conv_state=2, validate_data=False) == "v2"
    assert split_qkv_rmsnorm_rope(3, eps=1e-6) == "qkv"
    assert calls == [("v2", (1,), dict(conv_state=2, validate_data=False)), ("qkv", (3,), dict(eps=1e-6))]


_PROBE = textwrap.dedent(
    """
    import sys
    {pre}
    before = list(sys.meta_path)
    from sgl_accel.testing import standins
    try:
        standins.activate()
    except RuntimeError as e:
        print("REFUSED:", e)
    else:
        import torch_npu
        print("ACTIVATED", getattr(torch_npu, standins.MARKER, False))
    print("META_UNCHANGED", sys.meta_path == before)
    print("ACTIVE", standins.is_active())
    """
)


def _probe(tmp_path, pre="", fake=True):
    env_path = []
    sentinel = tmp_path / "fake_torch_npu_was_executed"
    if fake:
        pkg = tmp_path / "site" / "torch_npu"
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text(f"open({str(sentinel)!r}, 'w').close()\n")
        env_path.append(str(tmp_path / "site"))
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(env_path + [p for p in [env.get("PYTHONPATH")] if p])
    res = subprocess.run([sys.executable, "-c", _PROBE.format(pre=pre)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout, sentinel.exists()


def test_import_has_no_side_effects():
    code = (
        "import sys; before = list(sys.meta_path); import sgl_accel.testing.standins as s; "
        "print(sys.meta_path == before, s.is_active(), "
        "any(m.partition('.')[0] in s.ROOTS for m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.stdout.split() == ["True", "False", "False"], res.stderr


def test_activate_works_without_torch_npu(tmp_path):
    out, _ = _probe(tmp_path, fake=False)
    assert "ACTIVATED True" in out and "ACTIVE True" in out


def test_activate_refuses_when_torch_npu_is_importable(tmp_path):
    out, executed = _probe(tmp_path)
    assert "REFUSED:" in out and "torch_npu is importable" in out
    assert "META_UNCHANGED True" in out and "ACTIVE False" in out
    assert not executed  # refused before importing it


def test_activate_refuses_when_unmarked_torch_npu_is_imported(tmp_path):
    out, executed = _probe(tmp_path, pre="import torch_npu")
    assert executed
    assert "REFUSED:" in out and "without the stand-in marker" in out
    assert "META_UNCHANGED True" in out and "ACTIVE False" in out


# ---------------------------------------------------------------------------
# ROCm NSA decode reference (release-free)


def _oracle(q, kv, indices, scale, d_v):
    """Independent per-token, per-head loop in float64."""
    q64, rows = q.double(), kv.reshape(kv.shape[0], -1).double()
    idx = indices.reshape(indices.shape[0], -1)
    out = torch.zeros(q.shape[0], q.shape[1], d_v, dtype=torch.float64)
    for t in range(q.shape[0]):
        sel = [int(i) for i in idx[t] if int(i) != -1]
        if not sel:
            continue
        for h in range(q.shape[1]):
            s = torch.stack([q64[t, h].dot(rows[i]) * scale for i in sel])
            w = torch.exp(s - s.max())
            w = w / w.sum()
            out[t, h] = sum(w[j] * rows[i, :d_v] for j, i in enumerate(sel))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_mla_reference_matches_oracle(dtype):
    g = torch.Generator().manual_seed(1)
    T, H, D, d_v, N, K = 4, 3, 24, 16, 30, 7
    q = torch.randn(T, H, D, generator=g).to(dtype)
    kv = torch.randn(N, 1, D, generator=g).to(dtype)
    idx = torch.randint(0, N, (T, 1, K), generator=g)
    idx[0, 0, 2:] = -1
    idx[2, 0, :] = -1  # nothing selected -> zeros
    out = rocm.sparse_mla_reference(q, kv, idx, 0.2, d_v)
    assert out.shape == (T, H, d_v) and out.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.double(), _oracle(q, kv, idx, 0.2, d_v), **tol)
    assert out[2].eq(0).all()


def test_aiter_path_models_agree_with_sparse_reference():
    g = torch.Generator().manual_seed(2)
    T, H, D, d_v, N, K = 3, 2, 20, 12, 15, 5
    q = torch.randn(T, H, D, generator=g)
    kv = torch.randn(N, 1, D, generator=g)
    page_table = torch.randint(0, N, (T, K), generator=g, dtype=torch.int32)
    page_table[1, ::2] = -1
    counts = (page_table != -1).sum(1)
    kv_indptr = torch.zeros(T + 1, dtype=torch.int32)
    kv_indptr[1:] = torch.cumsum(counts, 0)
    kv_indices = torch.full((T * K,), -7, dtype=torch.int32)
    rocm.valid_kv_indices_reference(page_table, kv_indptr, kv_indices, T)
    flat = [int(i) for row in page_table for i in row if int(i) != -1]
    assert kv_indices[: len(flat)].tolist() == flat and kv_indices[len(flat):].eq(-7).all()

    o = torch.empty(T, H, d_v)
    qo_indptr = torch.arange(T + 1, dtype=torch.int32)
    rec = rocm.DecodeRecorder()
    rec.mla_decode_fwd(q, kv.view(-1, 1, 1, D), o, qo_indptr, kv_indptr, kv_indices, qo_indptr, 1, sm_scale=0.3)
    torch.testing.assert_close(o.double(), _oracle(q, kv, page_table, 0.3, d_v), rtol=1e-5, atol=1e-5)
    assert rec.decode_calls[0].q is q and rec.decode_calls[0].result is o


def test_recorder_install_and_restore_on_a_module():
    backend = types.ModuleType("fake_nsa_backend")
    original = lambda a, b: torch.cat([a, b], dim=-1)  # noqa: E731
    backend.concat_mla_absorb_q_general = original
    rec = rocm.DecodeRecorder()
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 2)
    with rec.installed(backend):
        out = backend.concat_mla_absorb_q_general(a, b)
        assert backend.mla_decode_fwd == rec.mla_decode_fwd
        assert backend.get_valid_kv_indices is rocm.valid_kv_indices_reference
    assert torch.equal(out, torch.cat([a, b], -1))
    [call] = rec.concat_calls
    assert call.q is out and call.args["q_nope"] is a
    assert backend.concat_mla_absorb_q_general is original
    assert not hasattr(backend, "mla_decode_fwd") and not hasattr(backend, "get_valid_kv_indices")
