"""Ascend CP prefill across real processes: torch.distributed on gloo, cp_size 2 and 4.

Four processes, one launch: the cp_size 2 cases run in two independent CP groups of two
(each group's ranks check their own output), the cp_size 4 cases in one group of four.

Each CP rank is a process running the release's own path (sgl_accel.testing.cp_prefill):
the split decision and metadata in ``Qwen3MoeForCausalLM.forward``, the token split, the K/V
all-gather over sglang's ``GroupCoordinator`` and the paged save
(``_cp_allgather_and_save_kv_npu``), ``do_cp_attn_fia`` with the test bed's FIA reference, and
the output re-gather. Every rank's gathered output is compared with causal attention over each
whole sequence (cached prefix + extend) computed with SDPA in float64.

The launch runs every case three times: all three patches (applied before sglang is
imported, the SGL_ACCEL=... order), the release as installed (after ``revert()``), and the
batching opt-in alone, applied after import (it must refuse to batch without the pieces it
needs).

Padding is a parameter of a case: sglang pads the batch to a multiple of cp_size, and with DP
attention in max-len mode to the largest DP rank's token count, so any amount can occur.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

RELEASE = os.environ.get("SGL_ACCEL_TEST_SGLANG") or ""
BATCHING_RELEASES = ("0.5.11", "0.5.12.post1")
UPSTREAM = "0.5.13.post1"  # has #23269/#26705; its block table still ignores the padding
pytestmark = [
    pytest.mark.sglang,
    pytest.mark.skipif(RELEASE not in BATCHING_RELEASES + (UPSTREAM,), reason="Ascend CP prefill from 0.5.11"),
]
ALL = ["ascend-cp-padding", "ascend-cp-attn-batch", "ascend-cp-prefill-batch"]


WORLD = 4
PATCHED_RUN, RELEASE_RUN, ALONE_RUN = 0, 1, 2


def case(name, cp, extend, prefix, pad, heads=4, kv_heads=2, seed=0):
    return dict(name=name, cp=cp, extend=extend, prefix=prefix, pad=pad, heads=heads, kv_heads=kv_heads,
                head_dim=16, page=128, seed=seed)


# Few, chosen cases; one launch runs all of them.
CASES = [
    case("cp2-bs1-no-prefix", 2, [37], [0], 1, seed=1),  # control: correct in the release too
    case("cp2-bs1-prefix-pad", 2, [30], [5], 2, seed=2),  # defect 1: prefix from the padded count
    case("cp2-bs1-pad-crosses-page", 2, [120], [0], 10, seed=3),  # defect 2: block table too narrow
    case("cp2-bs3-gqa-prefix", 2, [9, 40, 17], [3, 0, 250], 2, heads=8, kv_heads=2, seed=4),
    case("cp2-bs4-uneven", 2, [8, 33, 17, 9], [0, 200, 3, 127], 2, seed=5),
    case("cp4-bs1-prefix-pad", 4, [61], [7], 3, heads=4, kv_heads=1, seed=6),
    case("cp4-bs2-pad-crosses-page", 4, [40, 126], [0, 1], 2, seed=7),  # last sequence 127 + 2 padding
    case("cp4-bs4-gqa-prefix", 4, [8, 70, 19, 33], [130, 0, 5, 256], 2, heads=8, kv_heads=2, seed=8),
]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(tmp_path, world, runs):
    spec = tmp_path / f"spec{world}.json"
    spec.write_text(json.dumps({"runs": runs}))
    port = _free_port()
    procs, outs = [], []
    for rank in range(world):
        out = tmp_path / f"out{world}_{rank}.json"
        log = open(tmp_path / f"log{world}_{rank}.txt", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "sgl_accel.testing.cp_prefill", str(rank), str(world), str(port), str(spec), str(out)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
        ))
        outs.append(out)
    for rank, proc in enumerate(procs):
        try:
            code = proc.wait(timeout=900)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        assert code == 0, (tmp_path / f"log{world}_{rank}.txt").read_text()[-3000:]
    # results[rank][(run, case name)]
    return [{(r["run"], r["name"]): r for r in json.loads(out.read_text())} for out in outs]


@pytest.fixture(scope="module")
def world_results(tmp_path_factory):
    runs = [
        {"patches": ALL, "cases": CASES},  # applied before sglang is imported
        {"patches": [], "cases": CASES},  # reverted: the release as installed
    ]
    if RELEASE in BATCHING_RELEASES:
        runs.append({"patches": ["ascend-cp-prefill-batch"], "cases": [c for c in CASES if len(c["extend"]) > 1]})
    return WORLD, CASES, run_world(tmp_path_factory.mktemp("cp"), WORLD, runs)


def _by_rank(results, run, name):
    return [ranks[(run, name)] for ranks in results]


def test_release_as_installed(world_results):
    """The release: wrong with a cached prefix + padding (0.5.11/0.5.12.post1), out of its block
    table when the padding crosses a page (all three), batch 1 only (0.5.11/0.5.12.post1)."""
    world, cases, results = world_results
    for c in cases:
        ranks = _by_rank(results, RELEASE_RUN, c["name"])
        assert all(r["states"] == {} for r in ranks)
        if len(c["extend"]) > 1 and RELEASE != UPSTREAM:
            assert not any(r["split"] for r in ranks), ranks  # can_cp_split forces one sequence
            if RELEASE == "0.5.11":  # unsplit batches take the plain FIA path, which ignores cached prefixes
                assert not any(r["ok"] for r in ranks), ranks
            else:  # 0.5.12.post1: correct, but every rank computes the whole batch (no CP)
                assert all(r["ok"] for r in ranks), ranks
            continue
        assert all(r["split"] for r in ranks), ranks
        if "crosses-page" in c["name"]:
            assert any("block_table has" in (r.get("error") or "") for r in ranks), ranks
        elif RELEASE == UPSTREAM:  # #23269 and #26705: batches split, prefix right
            assert all(r["ok"] for r in ranks), ranks
        elif c["name"].endswith("bs1-no-prefix"):
            assert all(r["ok"] for r in ranks), ranks
        elif c["name"].endswith("bs1-prefix-pad"):
            assert not any(r["ok"] for r in ranks) and all(r["max_err"] > 0.1 for r in ranks), ranks


@pytest.mark.skipif(RELEASE not in BATCHING_RELEASES, reason="batched CP prefill is upstream from 0.5.13")
def test_batching_alone_refuses(world_results):
    """The opt-in alone (no per-sequence builder or attention) must not batch."""
    world, cases, results = world_results
    for c in cases:
        if len(c["extend"]) == 1:
            continue
        for r in _by_rank(results, ALONE_RUN, c["name"]):
            assert r["states"] == {"ascend-cp-prefill-batch": "applied"}, r
            assert r["split"] is False, r


def test_patched_equals_causal_attention(world_results):
    world, cases, results = world_results
    if RELEASE == UPSTREAM:
        states = {"ascend-cp-padding": "applied", "ascend-cp-attn-batch": "upstream", "ascend-cp-prefill-batch": "upstream"}
    else:
        states = {name: "applied" for name in ALL}
    for c in cases:
        for rank, r in enumerate(_by_rank(results, PATCHED_RUN, c["name"])):
            assert r["states"] == states, r
            assert r["split"], (rank, r)
            assert r["ok"], (world, rank, c, r)
