"""nsa-indexer-fusion (upstream #22232) against the real NSA ``Indexer`` of each release.

The Indexer is built with its own ``__init__`` (sgl_accel.cases.nsa_indexer_fusion). On
this CPU machine two GPU kernels need references: the in-place RoPE that ``forward_cuda``
calls and the Hadamard transform of ``rotate_activation``. With the test bed active (as
conftest makes it), the case builder installs those of
``sgl_accel.testing.kernels.indexer`` (checked against their oracles in
tests/test_kernel_indexer.py) for each call and restores the release's names after it;
``test_references_are_installed_only_for_a_call`` holds it to that.

ROCm's class state (the head-gate decorators evaluated with ``_is_hip`` True) is made
by evaluating the release's own decorator expression with ``_is_hip`` = True.
"""

import ast
import importlib
import importlib.util
import inspect
import textwrap

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sgl_accel.cases.nsa_indexer_fusion import specs_for
from sgl_accel.patches.nsa_indexer_fusion import HEAD_GATES, MODULE, PATCH, WRITE_BACKS
from sgl_accel.testing.opcount import OpCounter

NAME = PATCH.name
ROCM = "rocm:gfx942"
DSA_MODULE = "sglang.srt.layers.attention.dsa.dsa_indexer"  # where 0.5.13 moved the class


def _write_back():
    from sgl_accel.patches.nsa_indexer_fusion import _helpers

    return _helpers()["_sgl_accel_write_back"]


def _clone_setitem(dst, src):
    """The release's write-back, ``query[..., :r] = q_rope.clone()``, on given views."""
    dst[...] = src.clone()


# --------------------------------------------------------------------------- release access


def _indexer_module():
    """The module that defines the release's Indexer (nsa up to 0.5.12, dsa from 0.5.13)."""
    name = DSA_MODULE if importlib.util.find_spec("sglang.srt.layers.attention.dsa") else MODULE
    return importlib.import_module(name)


def _decorator_on_hip(module, function):
    """What the release's own decorator expression yields on ROCm (``_is_hip`` True)."""
    node = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
    assert len(node.decorator_list) == 1, "expected one decorator on the head-gate function"
    namespace = dict(vars(module), _is_hip=True)
    return eval(compile(ast.Expression(node.decorator_list[0]), "<release decorator>", "eval"), namespace)


def _gates_compiled_on_hip(module) -> bool:
    raw = inspect.unwrap(module.Indexer.__dict__[HEAD_GATES[0].split(".")[1]])
    return _decorator_on_hip(module, raw)(raw) is not raw


def _write_back_has_clone(module) -> bool:
    return all(".clone()" in inspect.getsource(module.Indexer.__dict__[q.split(".")[1]]) for q in WRITE_BACKS)


def _compile_context(fn):
    """The torch.compile context a wrapper closes over (its settings), or None."""
    cells = dict(zip(fn.__code__.co_freevars, fn.__closure__ or ()))
    cell = cells.get("self")
    return getattr(cell, "cell_contents", None)


def _in_range(release) -> bool:
    from packaging.specifiers import SpecifierSet

    return release in SpecifierSet(PATCH.releases)


@pytest.fixture
def cpu_bed(monkeypatch):
    """The case builder, with no server's global args (it makes its own). The kernel
    references come from the case builder itself (module docstring)."""
    from sglang.srt import server_args

    from sgl_accel.testing import standins

    assert standins.is_active(), "conftest activates the test bed for release runs"
    monkeypatch.setattr(server_args, "_global_server_args", None)
    from sgl_accel.cases import nsa_indexer_fusion as cases

    return cases


@pytest.fixture
def pre_change(sglang_release):
    """The release's indexer still has the code #22232 changed; else skip."""
    module = _indexer_module()
    if not _in_range(sglang_release) or not _write_back_has_clone(module):
        pytest.skip(f"sglang {sglang_release} already contains #22232")
    return importlib.import_module(MODULE)


def _apply(**kw):
    import sgl_accel

    importlib.import_module(MODULE)
    # The compatibility matrix may not list these fingerprints yet; the guard still runs.
    return sgl_accel.apply([NAME], allow_untested=True, **kw)[NAME]


# --------------------------------------------------------------------------- the write-back helper


def test_write_back_skips_only_the_identical_view():
    write_back = _write_back()
    buf = torch.arange(48, dtype=torch.bfloat16).view(3, 2, 8)
    before = buf.clone()
    dst, src = buf[..., :4], buf[..., :4]  # what an in-place RoPE kernel hands back
    with OpCounter() as ops:
        write_back(dst, src)
    assert sum(ops.ops.values()) == 0, ops.summary()
    assert torch.equal(buf, before)


def test_write_back_copies_a_same_start_view_with_other_strides():
    """Upstream's ``data_ptr`` test skips this pair; the release's code writes it."""
    write_back = _write_back()
    base = torch.arange(32, dtype=torch.float32).view(4, 8)
    views = lambda b: (b[:, :4], b.view(-1)[:16].view(4, 4))  # noqa: E731
    dst, src = views(base)
    assert src.data_ptr() == dst.data_ptr() and src.stride() != dst.stride()
    expected = base.clone()
    _clone_setitem(*views(expected))
    assert not torch.equal(expected, base), "the pair must hold other elements, or the case proves nothing"
    got = base.clone()
    with OpCounter() as ops:
        write_back(*views(got))
    assert torch.equal(got, expected)
    # The two views overlap: the snapshot the original's clone took is still needed.
    assert ops.count("aten.copy_") == 1 and ops.count("aten.clone") == 1, ops.summary()


@pytest.mark.parametrize("where", ["fresh tensor", "same storage, disjoint", "leading unit dims"])
def test_write_back_separate_memory_is_one_copy(where):
    write_back = _write_back()
    base = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    fresh = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))

    def views(b):
        if where == "fresh tensor":
            return b[:2, :3], fresh
        if where == "same storage, disjoint":  # (interleaved regions take the snapshot: see the helper)
            return b[:2, :3], b[2:, 5:]
        return b[:2, :3], fresh[None, None]  # DeepSeek-YaRN forward_native's shape for one token

    expected = base.clone()
    _clone_setitem(*views(expected))
    got = base.clone()
    dst, src = views(got)
    with OpCounter() as ops:
        write_back(dst, src)
    assert torch.equal(got, expected)
    assert ops.count("aten.copy_") == 1 and ops.count("aten.clone") == 0, ops.summary()


@st.composite
def _view_pairs(draw):
    rows, cols = draw(st.integers(1, 4)), draw(st.integers(2, 9))
    c0 = draw(st.integers(0, cols - 1))
    size = (rows, draw(st.integers(1, cols - c0)))
    dst = (c0, size, (cols, 1))
    numel = rows * cols

    def fits(offset, stride):
        return offset >= 0 and offset + sum((n - 1) * s for n, s in zip(size, stride)) < numel

    kind = draw(st.sampled_from(["same", "fresh", "same start", "shifted", "leading unit dims", "view with unit dims"]))
    if kind == "same start":
        stride = (draw(st.integers(0, cols + 1)), draw(st.integers(0, 2)))
        assume(stride != (cols, 1) and fits(c0, stride))
        src = (c0, size, stride)
    elif kind == "shifted":
        offset = c0 + draw(st.sampled_from([-cols, -2, -1, 1, 2, cols]))
        assume(fits(offset, (cols, 1)))
        src = (offset, size, (cols, 1))
    else:
        src = kind
    return numel, dst, src, draw(st.sampled_from([torch.float32, torch.bfloat16]))


@settings(max_examples=40, deadline=None)
@given(_view_pairs())
def test_write_back_matches_the_release_on_any_views(pair):
    numel, dst_spec, src_spec, dtype = pair
    write_back = _write_back()
    base = (torch.arange(numel, dtype=torch.float32) * 0.75 + 1).to(dtype)
    fresh = torch.randn(dst_spec[1], generator=torch.Generator().manual_seed(numel)).to(dtype)

    def views(b):
        dst = b.as_strided(dst_spec[1], dst_spec[2], dst_spec[0])
        if src_spec == "same":
            return dst, b.as_strided(dst_spec[1], dst_spec[2], dst_spec[0])
        if src_spec == "fresh":
            return dst, fresh
        if src_spec == "leading unit dims":
            return dst, fresh[None]
        if src_spec == "view with unit dims":
            return dst, dst[None, None]
        return dst, b.as_strided(src_spec[1], src_spec[2], src_spec[0])

    expected, got = base.clone(), base.clone()
    _clone_setitem(*views(expected))
    write_back(*views(got))
    assert torch.equal(got, expected)


def test_write_back_under_torch_compile():
    """Traced: no storage identity test (fullgraph would fail on one), same results."""
    write_back = _write_back()

    def scenario(write, buf, fresh):
        write(buf[:, 0:4], buf[:, 0:4])  # in-place RoPE result
        write(buf[:, 4:6], fresh)  # fresh RoPE result
        write(buf[1:, 6:8], buf[:-1, 6:8])  # overlapping other view
        return buf

    base = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    fresh = torch.randn(5, 2, generator=torch.Generator().manual_seed(4))
    expected = scenario(_clone_setitem, base.clone(), fresh)
    assert torch.equal(scenario(write_back, base.clone(), fresh), expected)
    compiled = torch.compile(lambda b, f: scenario(write_back, b, f), backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(base.clone(), fresh), expected)


# --------------------------------------------------------------------------- the emulation is scoped


_MISSING = object()


def _kernel_lookups(rotary):
    """What the release's code would find for its two kernels right now."""
    import sglang.jit_kernel.hadamard as jit_hadamard

    return (type(rotary).forward_cuda.__globals__.get("apply_rope_with_cos_sin_cache_inplace", _MISSING),
            vars(jit_hadamard).get("hadamard_transform", _MISSING))


@pytest.mark.sglang
@pytest.mark.parametrize("method", ["_get_q_k_bf16", "_get_k_bf16"])
def test_references_are_installed_only_for_a_call(cpu_bed, method):
    from sgl_accel.testing.kernels import indexer as ref

    cases = cpu_bed
    bed = cases.build(cases.Spec(method, "inplace", tokens=3), seed=0, device="cpu")
    before = _kernel_lookups(bed.indexer.rotary_emb)
    assert before[0] is _MISSING, "on a CPU the release imports no in-place RoPE kernel"
    assert before[1] is not ref.hadamard_transform
    seen = []

    def spy(indexer, *args):
        seen.append(_kernel_lookups(indexer.rotary_emb))
        return bed.module.Indexer.__dict__[method](indexer, *args)

    out = cases.call(bed, spy)
    assert seen == [(ref.apply_rope_with_cos_sin_cache_inplace, ref.hadamard_transform)]
    assert all(torch.isfinite(t.float()).all() for t in out)
    assert _kernel_lookups(bed.indexer.rotary_emb) == before

    def failing(indexer, *args):
        raise KeyError("inside the call")

    with pytest.raises(KeyError):
        cases.call(bed, failing)
    assert _kernel_lookups(bed.indexer.rotary_emb) == before


@pytest.mark.sglang
def test_without_the_test_bed_nothing_is_replaced(cpu_bed, monkeypatch):
    """As on a CUDA machine without stand-ins: the release's kernels, whatever they do
    here (the in-place case then has no kernel on a CPU and says so)."""
    from sgl_accel.testing import standins

    cases = cpu_bed
    monkeypatch.setattr(standins, "is_active", lambda: False)
    bed = cases.build(cases.Spec("_get_q_k_bf16", "inplace", tokens=2), seed=0, device="cpu")
    assert bed.kernels == [] and cases.reference_kernels(bed.indexer.rotary_emb) == []
    before = _kernel_lookups(bed.indexer.rotary_emb)
    with pytest.raises(RuntimeError, match="no in-place RoPE kernel"):
        cases.call(bed, bed.module.Indexer.__dict__["_get_q_k_bf16"])
    assert _kernel_lookups(bed.indexer.rotary_emb) == before


# --------------------------------------------------------------------------- per-release states


@pytest.mark.sglang
@pytest.mark.parametrize("hardware", [ROCM, "cuda"])
def test_states_per_release(accel, hardware, sglang_release):
    accel(hardware)
    module = _indexer_module()
    gates_done, rope_done = _gates_compiled_on_hip(module), not _write_back_has_clone(module)
    if not _in_range(sglang_release):
        # 0.5.13+: the class moved to dsa_indexer, the nsa path re-exports it, and it
        # already has both changes: the declared range ends before it.
        assert module.__name__ == DSA_MODULE and gates_done and rope_done
        report = _apply()
        assert report.state == "not-applicable", report.reason
        return
    names = [q.split(".")[1] for q in (*HEAD_GATES, *WRITE_BACKS)]
    before = {n: module.Indexer.__dict__[n] for n in names}
    report = _apply()
    want_rope = "upstream" if rope_done else "applied"
    want_gates = ("upstream" if gates_done else "applied") if hardware == ROCM else "not-applicable"
    assert report.parts["rope-writeback"] == want_rope, report.parts
    assert report.parts["compile-head-gates"].startswith(want_gates), report.parts
    changed = {n for n in names if module.Indexer.__dict__[n] is not before[n]}
    expected_changed = set()
    if want_rope == "applied":
        expected_changed |= {q.split(".")[1] for q in WRITE_BACKS}
    if want_gates == "applied":
        expected_changed |= {q.split(".")[1] for q in HEAD_GATES}
    assert changed == expected_changed
    assert report.state == ("applied" if expected_changed else "upstream"), report.reason
    import sgl_accel

    sgl_accel.revert([NAME])
    assert all(module.Indexer.__dict__[n] is before[n] for n in names)


def _drifted_copy(module, name, old, new, tmp_path):
    """The release's method with one textual change, compiled from a file of its own
    in the module's globals (the loader reads sources from the code's file)."""
    function = inspect.unwrap(module.Indexer.__dict__[name])
    source = textwrap.dedent(inspect.getsource(function))
    assert old in source
    path = tmp_path / f"drifted_{name}.py"
    path.write_text(source.replace(old, new))
    namespace = {}
    exec(compile(path.read_text(), str(path), "exec"), vars(module), namespace)
    return namespace[name]


@pytest.mark.sglang
@pytest.mark.parametrize("drift", ["rope-writeback", "compile-head-gates"])
def test_a_drifted_part_is_reported_and_the_other_applies(accel, pre_change, monkeypatch, tmp_path, drift):
    accel(ROCM)
    module = pre_change
    if drift == "rope-writeback":  # 0.5.9's write-back form
        target, old, new, other = "_get_k_bf16", "k_rope.clone()", "k_rope", "_project_and_scale_head_gates"
    else:
        target, old, new, other = "_get_logits_head_gate", "if not _is_hip else", "if not _is_npu else", "_get_q_k_bf16"
    monkeypatch.setattr(module.Indexer, target, _drifted_copy(module, target, old, new, tmp_path))
    untouched = {q.split(".")[1]: module.Indexer.__dict__[q.split(".")[1]] for q in (*HEAD_GATES, *WRITE_BACKS)}
    report = _apply()
    assert report.parts[drift].startswith("skipped:") and f"Indexer.{target}" in report.parts[drift], report.parts
    # 0.5.9's write-back is a known older form (named so); the other drift is of unknown shape.
    assert ("older form" if drift == "rope-writeback" else "matched 0 site(s)") in report.parts[drift]
    other_part = next(p for p in report.parts if p != drift)
    assert report.parts[other_part] == "applied"
    assert report.state == "applied" and f"{drift}: skipped" in report.reason
    drifted_part = next(p for p in PATCH.parts if p.name == drift)
    for t in drifted_part.targets:  # a part is atomic: none of its targets changed
        name = t.qualname.split(".")[1]
        assert module.Indexer.__dict__[name] is untouched[name]
    assert module.Indexer.__dict__[other] is not untouched[other]


# --------------------------------------------------------------------------- equivalence and op counts


_SPECS = {spec.label(): spec for spec in specs_for("cpu")}


@pytest.mark.sglang
@pytest.mark.parametrize("label", list(_SPECS))
def test_patched_matches_original(accel, pre_change, cpu_bed, label):
    accel("cuda")
    cases = cpu_bed
    assert _apply().parts["rope-writeback"] == "applied"
    for seed in (0, 1):
        for comparison in cases.evaluate(_SPECS[label], seed, device="cpu"):
            assert comparison.passed, (label, seed, comparison)


@pytest.mark.sglang
def test_patched_matches_original_with_both_parts_on_rocm(accel, pre_change, cpu_bed):
    accel(ROCM)
    report = _apply()
    assert set(report.parts.values()) == {"applied"}, report.parts
    for spec in (cpu_bed.Spec("_get_q_k_bf16", "inplace", tokens=4), cpu_bed.Spec("_get_k_bf16", "native", tokens=1)):
        assert all(c.passed for c in cpu_bed.evaluate(spec, 2, device="cpu"))


_COUNTED = [("_get_q_k_bf16", "inplace", "deepseek_yarn", 7), ("_get_q_k_bf16", "native", "none", 6),
            ("_get_q_k_bf16", "native", "deepseek_yarn", 1), ("_get_k_bf16", "inplace", "none", 5),
            ("_get_k_bf16", "native", "none", 5)]


@pytest.mark.sglang
@pytest.mark.parametrize("method,rope,scaling,tokens", _COUNTED)
def test_op_counts_per_call(accel, pre_change, cpu_bed, method, rope, scaling, tokens):
    """Per call: every clone gone; the copies too where RoPE ran in place."""
    accel("cuda")
    cases = cpu_bed
    _apply()
    spec = cases.Spec(method, rope, tokens=tokens, scaling=scaling)
    bed = cases.build(spec, seed=3, device="cpu")
    original, patched = cases.functions(method, bed.module)
    counts = {}
    for side, fn in (("original", original), ("patched", patched)):
        args = cases.inputs(bed)
        with OpCounter() as counter:
            cases.call(bed, fn, args)
        counts[side] = counter
    orig, new = counts["original"], counts["patched"]
    sites = WRITE_BACKS[f"Indexer.{method}"]
    rows = [spec.tokens * spec.heads * spec.rope_dim, spec.tokens * spec.rope_dim][-sites:]  # (query,) key slices
    why = f"patched vs original: {new.diff(orig)}"
    assert orig.count("aten.clone") == sites and new.count("aten.clone") == 0, why
    assert orig.count("aten.copy_") == sites, why
    assert new.count("aten.copy_") == (0 if rope == "inplace" else sites), why
    assert orig.bytes_allocated - new.bytes_allocated == sum(rows) * 2, why  # bf16 clones
    assert new.allocations == orig.allocations - sites, why


# --------------------------------------------------------------------------- the ROCm compile part


def _rocm_class_state(module, monkeypatch):
    """Put the head-gate functions in the state the release leaves them in on ROCm."""
    states = {}
    for qualname in HEAD_GATES:
        name = qualname.split(".")[1]
        cuda_state = module.Indexer.__dict__[name]
        raw = inspect.unwrap(cuda_state)
        rocm_state = _decorator_on_hip(module, raw)(raw)
        monkeypatch.setattr(module.Indexer, name, rocm_state)
        states[name] = (raw, cuda_state, rocm_state)
    return states


@pytest.mark.sglang
def test_rocm_compiles_the_head_gates_as_cuda_does(accel, pre_change, cpu_bed, monkeypatch):
    module = pre_change
    states = _rocm_class_state(module, monkeypatch)
    for name, (raw, cuda_state, rocm_state) in states.items():
        assert rocm_state is raw, f"the release already compiles {name} on ROCm"
        assert cuda_state is not raw and _compile_context(cuda_state) is not None
    accel(ROCM)
    report = _apply()
    assert report.parts["compile-head-gates"] == "applied", report.parts
    for name, (raw, cuda_state, _) in states.items():
        new = module.Indexer.__dict__[name]
        inner = inspect.unwrap(new)
        assert new is not inner, f"{name} is not wrapped"
        assert getattr(inner, "__sgl_accel_patch__", None) == NAME and inner.__sgl_accel_original__ is raw
        # The same torch.compile wrapper, with the same settings (dynamic=True), as on CUDA.
        assert new.__code__ is cuda_state.__code__
        ctx_new, ctx_cuda = _compile_context(new), _compile_context(cuda_state)
        assert type(ctx_new) is type(ctx_cuda) and getattr(ctx_new, "_dynamic", None) == getattr(ctx_cuda, "_dynamic", None)
    # One call through the compiled function, with the release's HIP branch, as eager.
    monkeypatch.setattr(module, "_is_hip", True)
    bed = cpu_bed.build(cpu_bed.Spec("_get_q_k_bf16", "native", tokens=5), seed=4, device="cpu")
    name = HEAD_GATES[0].split(".")[1]
    with torch.no_grad():
        want = states[name][0](bed.indexer, bed.x)
        got = module.Indexer.__dict__[name](bed.indexer, bed.x)
    torch.testing.assert_close(got, want)


@pytest.mark.sglang
def test_cuda_leaves_the_head_gates_alone(accel, pre_change):
    accel("cuda")
    module = pre_change
    before = {q: module.Indexer.__dict__[q.split(".")[1]] for q in HEAD_GATES}
    report = _apply()
    assert report.parts["compile-head-gates"].startswith("not-applicable"), report.parts
    assert all(module.Indexer.__dict__[q.split(".")[1]] is before[q] for q in HEAD_GATES)


# --------------------------------------------------------------------------- against upstream's guard


@pytest.mark.sglang
def test_upstream_guard_skips_what_this_patch_copies():
    module = _indexer_module()
    guard = module.Indexer.__dict__.get("_update_rope_guarded")
    if guard is None:
        pytest.skip("this release predates upstream's _update_rope_guarded")
    guard = guard.__func__ if isinstance(guard, staticmethod) else guard
    base = torch.arange(32, dtype=torch.float32).view(4, 8)
    views = lambda b: (b[:, :4], b.view(-1)[:16].view(4, 4))  # noqa: E731
    expected = base.clone()
    _clone_setitem(*views(expected))
    upstream, ours = base.clone(), base.clone()
    guard(*views(upstream))
    _write_back()(*views(ours))
    assert torch.equal(ours, expected)
    assert torch.equal(upstream, base) and not torch.equal(upstream, expected)
