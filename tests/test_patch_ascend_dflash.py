"""ascend-dflash (upstream #23122) against the real DFlash / Ascend code of each release.

0.5.11 and 0.5.12.post1: the patch applies on (emulated) Ascend and every case of
sgl_accel.cases.ascend_dflash holds; the unpatched functions are shown to have the
defects the patch removes (causal mask on the non-causal draft, flashinfer
fallback, stale embeddings on replay). 0.5.13.post1 has the change (upstream);
0.5.10.post1 has no DFlash. Off Ascend the patch is not applicable.

Ascend is emulated: SGL_ACCEL_HARDWARE=ascend for the loader, the test-bed kernels
for split_qkv_rmsnorm_rope and FIA; the rest (``_is_npu`` of sglang's rotary module,
global server args, parallel state) is set up and restored by the cases module's
``emulation()``, which every case holds itself: ``test_case`` runs the cases as
``sgl-accel verify`` does, and ``test_verify_emulate_in_bare_process`` runs verify.
"""

import importlib
import importlib.util
import os
import types
from pathlib import Path

import pytest

NAME = "ascend-dflash"
RELEASE = os.environ.get("SGL_ACCEL_TEST_SGLANG") or ""
APPLIES = ("0.5.11", "0.5.12.post1")
UPSTREAM = ("0.5.13.post1",)
NO_DFLASH = ("0.5.10.post1",)
ROOT = Path(__file__).resolve().parents[1]

DFLASH = "sglang.srt.models.dflash"
WORKER = "sglang.srt.speculative.dflash_worker"
RUNNER = "sglang.srt.hardware_backend.npu.graph_runner.npu_graph_runner"
BACKEND = "sglang.srt.hardware_backend.npu.attention.ascend_backend"
ROTARY = "sglang.srt.layers.rotary_embedding.base"
TARGETS = (
    (DFLASH, "DFlashAttention", "forward"),
    (WORKER, "DFlashWorker", "__init__"),
    (WORKER, "DFlashWorker", "_append_target_hidden_sequential"),
    (RUNNER, "NPUGraphRunner", "replay"),
    (BACKEND, "AscendAttnBackend", "forward_mtp"),
)

needs_dflash = pytest.mark.skipif(RELEASE not in APPLIES, reason="pre-change DFlash exists in 0.5.11 / 0.5.12.post1")


def cases():
    from sgl_accel.cases import ascend_dflash

    return ascend_dflash


def installed():
    """{(class, method): the object currently on the class} for every target."""
    return {(cls, attr): importlib.import_module(mod).__dict__[cls].__dict__[attr] for mod, cls, attr in TARGETS}


@pytest.fixture(scope="module")
def modules():
    if RELEASE in NO_DFLASH:
        pytest.skip("no DFlash in this release")
    return {name: importlib.import_module(name) for name in (DFLASH, WORKER, RUNNER, BACKEND)}


@pytest.fixture
def ascend(accel, modules):
    accel("ascend")


@pytest.fixture
def emulated(modules):
    """For tests that call the case builders directly: the cases module's own emulation
    (Ascend rotary flags, server args, parallel state), undone afterwards."""
    with cases().emulation():
        yield


@pytest.fixture
def applied(ascend):
    import sgl_accel

    before = installed()
    report = sgl_accel.apply([NAME], allow_untested=True)[NAME]
    assert report.state == "applied", report.reason
    now = installed()
    for key, obj in now.items():
        assert obj is not before[key] and obj.__sgl_accel_original__ is before[key], key
    return before


# --------------------------------------------------------------------------- without a release


def test_declaration():
    from sgl_accel._registry import all_patches
    from sgl_accel._rewrite import Rule, _parse_pattern

    patch = all_patches()[NAME]
    assert patch.hardware == ("ascend",)
    assert patch.kernels == ("sgl_kernel_npu.norm.split_qkv_rmsnorm_rope:split_qkv_rmsnorm_rope",)
    # The four pieces are one part: the loader applies a part atomically.
    assert len(patch.parts) == 1
    keys = {t.key for t in patch.targets}
    assert keys == {f"{mod}:{cls}.{attr}" for mod, cls, attr in TARGETS}
    for target in patch.targets:
        assert target.rules and target.upstream, target.key
        for rule in target.rules:
            assert isinstance(rule, Rule)
            kind, _ = _parse_pattern(rule.find)
            rkind, _ = _parse_pattern(rule.replace)
            assert kind == rkind == "stmts", rule.description


def test_static_verdicts_per_release():
    """What the scanner sees in every installed release's source (no import)."""
    from sgl_accel._guard import check_static
    from sgl_accel._registry import all_patches

    patch = all_patches()[NAME]
    expected = {"0.5.10.post1": "absent", "0.5.11": "applies", "0.5.12.post1": "applies", "0.5.13.post1": "upstream"}
    for release, state in expected.items():
        root = ROOT / ".envs" / f"sglang-{release}" / "sglang"
        if not root.is_dir():
            pytest.skip(f"sglang {release} is not installed in .envs")
        verdicts = {t.key: check_static(t, str(root)) for t in patch.targets}
        if state == "absent":
            # No DFlash; the NPU runner and backend exist, so the part cannot apply.
            verdicts = {k: v for k, v in verdicts.items() if ".dflash" in k}
        for key, verdict in verdicts.items():
            assert verdict.state == state, (release, key, verdict.reason)


# --------------------------------------------------------------------------- states


@pytest.mark.sglang
@pytest.mark.parametrize("hardware", ["cpu", "cuda:sm90", "rocm:gfx942"])
def test_not_applicable_off_ascend(accel, hardware):
    import sgl_accel

    accel(hardware)
    if RELEASE not in NO_DFLASH:
        for name in (DFLASH, WORKER, RUNNER, BACKEND):
            importlib.import_module(name)
        before = installed()
    report = sgl_accel.apply([NAME], allow_untested=True)[NAME]
    assert report.state == "not-applicable", report.reason
    if RELEASE not in NO_DFLASH:
        assert installed() == before


@pytest.mark.sglang
@pytest.mark.skipif(RELEASE not in NO_DFLASH, reason="0.5.10.post1 only")
def test_release_without_dflash(accel):
    import sgl_accel

    accel("ascend")
    assert importlib.util.find_spec(DFLASH) is None and importlib.util.find_spec(WORKER) is None
    report = sgl_accel.apply([NAME], allow_untested=True)[NAME]
    assert report.state == "not-applicable", report.reason


@pytest.mark.sglang
@pytest.mark.skipif(RELEASE not in UPSTREAM, reason="the change is in 0.5.13.post1")
def test_upstream_release(ascend):
    import sgl_accel

    before = installed()
    report = sgl_accel.apply([NAME], allow_untested=True)[NAME]
    assert report.state == "upstream", report.reason
    assert {t.state for t in report.targets} == {"upstream"}
    assert installed() == before


@pytest.mark.sglang
@needs_dflash
def test_applies_under_tested_source_policy(ascend):
    """Without SGL_ACCEL_ALLOW_UNTESTED: the scanner matrix knows these releases' targets."""
    import sgl_accel

    report = sgl_accel.apply([NAME])[NAME]
    assert report.state == "applied", report.reason
    assert {t.state for t in report.targets} == {"applied"}


@pytest.mark.sglang
@needs_dflash
def test_applies_and_reverts(applied):
    import sgl_accel

    sgl_accel.revert([NAME])
    assert installed() == applied


# --------------------------------------------------------------------------- equivalence cases


def _case_ids():
    return [case.name for case in cases().CASES]


@pytest.mark.sglang
@needs_dflash
@pytest.mark.parametrize("name", _case_ids())
def test_case(applied, name):
    case = next(c for c in cases().CASES if c.name == name)
    results = case.run(0)
    assert results
    failed = [f"{r.what}: {r.max_abs_diff} > {r.tolerance} {r.note}" for r in results if not r.passed]
    assert not failed, "\n".join(failed)


def _process_state():
    """The global state the cases' emulation touches, as comparable values."""
    import torch.distributed as dist

    server_args = importlib.import_module("sglang.srt.server_args")
    ps = importlib.import_module("sglang.srt.distributed.parallel_state")
    factory = importlib.import_module("sglang.srt.layers.rotary_embedding.factory")
    return {
        "_is_npu": importlib.import_module(ROTARY)._is_npu,
        "server_args": id(server_args._global_server_args) if server_args._global_server_args is not None else None,
        "model_parallel": ps.model_parallel_is_initialized(),
        "dist": dist.is_initialized(),
        "rope_cache": set(factory._ROPE_DICT),
    }


@pytest.mark.sglang
@needs_dflash
def test_cases_restore_process_state(applied):
    """A case sets up its emulation and undoes it: bare before, bare after; inside an
    enclosing emulation it uses that one and leaves it in place."""
    case = next(c for c in cases().CASES if c.name == "append-gqa4-d64")
    before = _process_state()
    assert before["_is_npu"] is False and not before["model_parallel"]
    assert all(r.passed for r in case.run(0))
    assert _process_state() == before
    with cases().emulation():
        inside = _process_state()
        assert inside["_is_npu"] is True and inside["model_parallel"] and inside["server_args"] is not None
        assert all(r.passed for r in case.run(0))
        assert {k: v for k, v in _process_state().items() if k != "rope_cache"} == {
            k: v for k, v in inside.items() if k != "rope_cache"
        }
    assert _process_state() == before


@pytest.mark.sglang
@needs_dflash
def test_verify_emulate_in_bare_process():
    """``sgl-accel verify --emulate`` in a fresh interpreter (no test fixtures, no
    conftest stand-ins): every case passes, and the process is left as it was."""
    import json
    import subprocess
    import sys

    script = f"""
import json, importlib
from sgl_accel._verify import verify
(result,) = verify([{NAME!r}], emulate=True)
ps = importlib.import_module("sglang.srt.distributed.parallel_state")
import torch.distributed as dist
print(json.dumps(dict(
    outcome=result.outcome, reason=result.reason,
    failed=[(c["name"], c["details"]) for c in result.cases if not c["passed"]],
    is_npu=importlib.import_module({ROTARY!r})._is_npu,
    server_args=importlib.import_module("sglang.srt.server_args")._global_server_args is None,
    parallel=ps.model_parallel_is_initialized() or dist.is_initialized(),
)))
"""
    env = {k: v for k, v in os.environ.items() if k != "SGL_ACCEL_HARDWARE"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["outcome"] == "pass", (report["reason"], report["failed"])
    assert report["reason"].startswith(f"{len(cases().CASES)}/{len(cases().CASES)} ")
    assert report["is_npu"] is False and report["server_args"] is True and report["parallel"] is False


@pytest.mark.sglang
@needs_dflash
@pytest.mark.parametrize("seed", [1, 2])
def test_qkv_more_seeds(applied, emulated, seed):
    C = cases()
    for shape in (C.Shape(num_heads=8, num_kv_heads=2, head_dim=128, norm_bias="both"), C.Shape(num_heads=4, num_kv_heads=4)):
        results = C.run_qkv(shape, seed, num_requests=2)
        assert all(r.passed for r in results), [r.what for r in results if not r.passed]


# --------------------------------------------------------------------------- the fused path is the one taken


@pytest.fixture
def kernel_calls(monkeypatch):
    """Calls of the test-bed split_qkv_rmsnorm_rope (the stand-in looks it up per call)."""
    from sgl_accel.testing.kernels import split_qkv

    calls = []
    real = split_qkv.split_qkv_rmsnorm_rope

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(split_qkv, "split_qkv_rmsnorm_rope", counted)
    return calls


def _forward_all_layers(shape, seed, function=None):
    import torch

    C = cases()
    model = C.build_model(shape, seed)
    attns = [layer.self_attn for layer in model.layers]
    gen = torch.Generator().manual_seed(seed)
    positions = C.block_positions(gen, 2, shape.block_size)
    hiddens = [torch.randn(2 * shape.block_size, shape.hidden_size, generator=gen).to(torch.bfloat16) for _ in attns]
    forward = function or type(attns[0]).forward
    with torch.no_grad():
        return C._run_layers(forward, attns, positions, hiddens, shape.block_size)


@pytest.mark.sglang
@needs_dflash
def test_fused_kernel_called_once_per_layer(applied, emulated, kernel_calls):
    shape = cases().Shape(num_layers=3)
    _forward_all_layers(shape, 3)
    assert len(kernel_calls) == shape.num_layers
    # sglang's own RMSNorm has no bias: none is passed.
    assert all(call["q_bias"] is None and call["k_bias"] is None for call in kernel_calls)


@pytest.mark.sglang
@needs_dflash
def test_biases_reach_the_kernel(applied, emulated, kernel_calls):
    shape = cases().Shape(num_layers=1, norm_bias="k")
    _forward_all_layers(shape, 4)
    (call,) = kernel_calls
    # k bias only: the kernel keys its bias flag on q_bias, so q gets explicit zeros.
    assert call["q_bias"] is not None and not call["q_bias"].any()
    assert call["k_bias"] is not None and call["k_bias"].abs().sum() > 0


@pytest.mark.sglang
@needs_dflash
def test_interleaved_rope_stays_unfused(applied, emulated, kernel_calls):
    _forward_all_layers(cases().Shape(neox=False), 5)
    assert kernel_calls == []


# --------------------------------------------------------------------------- the defects, and that the checks see them


@pytest.mark.sglang
@needs_dflash
def test_original_forward_mtp_is_causal_for_encoder_only(applied, emulated):
    """Unpatched, DFlash's non-causal draft layer gets the chain mask: the oracle sees it."""
    from sgl_accel.cases import compare

    C = cases()
    shape = C.Shape()
    out, ref, _ = C.run_mtp(shape, 7, function=applied[("AscendAttnBackend", "forward_mtp")], encoder_only=True)
    assert not compare("x", out, ref.to(out.dtype), C.scaled_tolerance(ref, out.dtype)).passed
    out, ref, _ = C.run_mtp(shape, 7, encoder_only=True)
    assert compare("x", out, ref.to(out.dtype), C.scaled_tolerance(ref, out.dtype)).passed


@pytest.mark.sglang
@needs_dflash
def test_original_draft_step_on_ascend_is_wrong(applied, emulated):
    """The whole draft step with the unpatched forward_mtp differs from the oracle."""
    C = cases()
    backend = importlib.import_module(BACKEND).AscendAttnBackend
    with C.installed(backend, "forward_mtp", applied[("AscendAttnBackend", "forward_mtp")]):
        results = C.run_draft_step(C.Shape(), 8)
    assert not results[0].passed
    assert all(r.passed for r in C.run_draft_step(C.Shape(), 8))


@pytest.mark.sglang
@needs_dflash
@pytest.mark.parametrize("draft_backend, attention_backend", [("ascend", None), (None, "ascend")])
def test_original_worker_falls_back_to_flashinfer(applied, draft_backend, attention_backend):
    C = cases()
    original = applied[("DFlashWorker", "__init__")]
    chosen = C.chosen_draft_backend(original, draft_backend=draft_backend, attention_backend=attention_backend)
    assert chosen == "flashinfer"
    patched = importlib.import_module(WORKER).DFlashWorker.__init__
    assert C.chosen_draft_backend(patched, draft_backend=draft_backend, attention_backend=attention_backend) == "ascend"


@pytest.mark.sglang
@needs_dflash
def test_original_replay_leaves_stale_embeddings(applied, emulated):
    import torch

    C = cases()
    runner = C.make_graph_runner(draft=True, dflash=True, bs=2, block=4, hidden=16, dtype=torch.bfloat16)
    seen, batch = C.replay_once(applied[("NPUGraphRunner", "replay")], runner, 9, 16, torch.bfloat16)
    assert not torch.equal(seen["input_embeds"], batch.input_embeds)
    assert torch.equal(seen["positions"], batch.positions)


@pytest.mark.sglang
@needs_dflash
def test_upstream_style_layer0_cache_fails_the_case(applied, emulated):
    """Rows refreshed only at layer 0 (upstream's rule) go stale when another layer sees
    new positions first; the qkv case catches that, the patch's own rule does not."""
    import torch

    C = cases()
    shape = C.Shape(num_layers=2)
    model = C.build_model(shape, 11)
    attns = [layer.self_attn for layer in model.layers]
    rope = attns[0].rotary_emb
    patched = type(attns[0]).forward
    gen = torch.Generator().manual_seed(11)
    hiddens = [torch.randn(2 * shape.block_size, shape.hidden_size, generator=gen).to(torch.bfloat16) for _ in attns]
    first = C.block_positions(gen, 2, shape.block_size)
    second = C.block_positions(gen, 2, shape.block_size)
    original = applied[("DFlashAttention", "forward")]
    with torch.no_grad():
        C._run_layers(patched, attns, first, hiddens, shape.block_size)
        # Layer 1 alone with new positions: the patch rebuilds the rows ...
        got, _ = C._run_layers(patched, attns[1:], second, hiddens[1:], shape.block_size)
        want, _ = C._run_layers(original, attns[1:], second, hiddens[1:], shape.block_size)
        assert C.close("q", got[0][1], want[0][1], torch.bfloat16).passed
        # ... while the rows upstream would use are the first forward's.
        rope.get_cos_sin_with_position(first)
        cos, sin = rope.position_cos, rope.position_sin
        from sgl_accel.testing.kernels.split_qkv import split_qkv_rmsnorm_rope

        attn = attns[1]
        qkv, _ = attn.qkv_proj(hiddens[1])
        q_stale, _, _ = split_qkv_rmsnorm_rope(
            qkv, sin, cos, attn.q_size, attn.kv_size, attn.head_dim, eps=attn.q_norm.variance_epsilon,
            q_weight=attn.q_norm.weight, k_weight=attn.k_norm.weight,
        )
    assert not C.close("q", q_stale, want[0][1], torch.bfloat16).passed
