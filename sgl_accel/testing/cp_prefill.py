"""One CP rank of an Ascend context-parallel prefill, run on CPU over gloo (test bed only).

``python -m sgl_accel.testing.cp_prefill RANK WORLD PORT SPEC.json OUT.json`` joins a gloo
process group of WORLD processes and runs each case of SPEC, with the case's cp_size ("cp": 2
or 4; cp 2 on 4 processes runs as two independent groups of two), through the release's own
code path:

``Qwen3MoeForCausalLM.forward`` (the split decision ``can_cp_split`` and
``prepare_context_parallel_metadata``) -> ``cp_split_and_rebuild_data`` (token split) ->
``AscendAttnBackend.forward_extend`` (``_cp_allgather_and_save_kv_npu``: all-gather of K/V over
the real ``GroupCoordinator`` on gloo, write to the paged pool; ``do_cp_attn_fia`` with the
test bed's FIA reference) -> ``cp_all_gather_rerange_output`` (output re-gather).

The model around attention is a table lookup: token i of the (padded) batch carries the q/k/v
rows drawn for it, so the gathered output can be compared with causal attention over each whole
sequence (cached prefix + extend) computed directly with SDPA in float64. Every rank compares
its own gathered output. ``AscendAttnBackend.__init__`` needs an NPU, so the backend is the real
class made with ``object.__new__`` (``sgl_accel.cases.ascend_cp_attn_batch.make_backend``); the
KV pool is a plain paged buffer with the pool interface the CP path calls.

SPEC: {"runs": [{"patches": [names, or [] for the release], "cases": [{"name", "extend",
"prefix", "pad", "cp", "heads", "kv_heads", "head_dim", "page", "seed"}]}, ...]}: the runs share one
process group; the first run's patches are applied before sglang is imported, later ones after
(``revert()`` in between). OUT: per run and case {"run", "name", "states", "ok", "max_err",
"split", "error"}.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import types

TOLERANCE = 2e-4  # float32 FIA reference vs float64 oracle


class PagedPool:
    """The KV pool interface the CP path uses: one layer, [slots, kv_heads, head_dim] buffers."""

    def __init__(self, k, v):
        self.k, self.v = k, v

    def set_kv_buffer(self, layer, loc, cache_k, cache_v, *args, **kwargs):
        self.k[loc.long()] = cache_k.to(self.k.dtype)
        self.v[loc.long()] = cache_v.to(self.v.dtype)

    def get_key_buffer(self, layer_id):
        return self.k

    def get_value_buffer(self, layer_id):
        return self.v


def _cuda_means_cpu():
    """What torch_npu's transfer_to_npu does on Ascend ("cuda" -> the device), with the CPU as device."""
    import torch

    real = torch.tensor

    def tensor(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return real(*args, **kwargs)

    torch.tensor = tensor


def setup(rank, world, port):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from datetime import timedelta

    # A bounded wait: a rank stuck in a collective fails the test instead of hanging it.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    _cuda_means_cpu()
    from sglang.srt import server_args
    from sglang.srt.distributed import parallel_state

    from sgl_accel.cases.ascend_cp_padding import server_args_for_cp

    server_args._global_server_args = server_args_for_cp(world)
    # One coordinator per CP size: cp_size 2 on 4 processes is two groups of two.
    groups = {}
    for cp in (2, 4):
        if world % cp == 0:
            groups[cp] = parallel_state.GroupCoordinator(
                group_ranks=[list(range(start, start + cp)) for start in range(0, world, cp)], local_rank=rank,
                torch_distributed_backend="gloo", use_pynccl=False, use_pymscclpp=False, use_custom_allreduce=False,
                use_torch_symm_mem_all_reduce=False, use_hpu_communicator=False, use_xpu_communicator=False,
                use_npu_communicator=False, group_name=f"attn_cp{cp}",
            )
    # The Ascend path of the coordinator (all_gather_into_tensor -> torch.distributed on the group).
    parallel_state._is_npu = True
    return groups


def use_cp_group(group):
    """Make ``group`` the attention CP group sglang's CP code looks up."""
    from sglang.srt import server_args
    from sglang.srt.distributed import parallel_state

    parallel_state._ATTN_CP = group
    server_args._global_server_args.attn_cp_size = group.world_size
    return group.rank_in_group, group.world_size


def _case_data(case, world):
    """Whole sequences, the paged pool with each prefix cached, the batch, and the oracle."""
    import torch
    import torch.nn.functional as F

    from sgl_accel.cases.ascend_cp_attn_batch import make_backend

    gen = torch.Generator().manual_seed(case["seed"])
    hq, hkv, d, page = case["heads"], case["kv_heads"], case["head_dim"], case["page"]
    extend, prefix, pad = case["extend"], case["prefix"], case["pad"]
    totals = [p + e for p, e in zip(prefix, extend)]
    qs = [torch.randn(t, hq, d, generator=gen) for t in totals]
    ks = [torch.randn(t, hkv, d, generator=gen) for t in totals]
    vs = [torch.randn(t, hkv, d, generator=gen) for t in totals]

    # Paged pool, page 0 reserved (padding tokens write slot 0, as sglang's padded out_cache_loc does).
    pages = [-(-t // page) for t in totals]
    num_pages = 1 + sum(pages) + 2
    order = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    k_pool = torch.randn(num_pages * page, hkv, d, generator=gen) * 50  # unwritten slots: loud values
    v_pool = torch.randn(num_pages * page, hkv, d, generator=gen) * 50
    width = (max(pages) + 2) * page
    req_to_token = torch.zeros(len(totals) + 1, width, dtype=torch.int32)
    slots = []
    for s, t in enumerate(totals):
        mine = torch.tensor(order[:pages[s]]); order = order[pages[s]:]
        pos = torch.arange(t)
        slots.append((mine[pos // page] * page + pos % page).to(torch.int32))
        req_to_token[s + 1, :t] = slots[s]
        k_pool[slots[s][: prefix[s]].long()] = ks[s][: prefix[s]]
        v_pool[slots[s][: prefix[s]].long()] = vs[s][: prefix[s]]

    # Token rows of the padded batch: extend tokens in batch order, then `pad` zero rows.
    q_rows = torch.cat([q[p:] for q, p in zip(qs, prefix)] + [torch.zeros(pad, hq, d)])
    k_rows = torch.cat([k[p:] for k, p in zip(ks, prefix)] + [torch.zeros(pad, hkv, d)])
    v_rows = torch.cat([v[p:] for v, p in zip(vs, prefix)] + [torch.zeros(pad, hkv, d)])
    out_loc = torch.cat([sl[p:] for sl, p in zip(slots, prefix)] + [torch.zeros(pad, dtype=torch.int32)])
    positions = torch.cat([torch.arange(p, t) for p, t in zip(prefix, totals)] + [torch.zeros(pad, dtype=torch.int64)])

    scale = d**-0.5
    oracle = []
    for q, k, v, p in zip(qs, ks, vs, prefix):
        o = F.scaled_dot_product_attention(
            q.double().transpose(0, 1), k.double().transpose(0, 1), v.double().transpose(0, 1),
            is_causal=True, scale=scale, enable_gqa=True,
        ).transpose(0, 1)
        oracle.append(o[p:])  # rows of the extend tokens (the prefix is causal-first, so this is exact)
    oracle = torch.cat(oracle).reshape(-1, hq * d)

    fb_mod = __import__("sglang.srt.model_executor.forward_batch_info", fromlist=["ForwardMode"])
    backend = make_backend(page, req_to_token)
    backend.attn_cp_size = world
    backend.use_fia = True
    backend.is_dllm_model = False
    pool = PagedPool(k_pool, v_pool)
    backend.token_to_kv_pool = pool  # 0.5.13 reads the pool from the backend
    seq_lens = torch.tensor(totals, dtype=torch.int64)
    batch = types.SimpleNamespace(
        forward_mode=fb_mod.ForwardMode.EXTEND,
        batch_size=len(totals),
        input_ids=torch.arange(q_rows.shape[0]),
        positions=positions,
        seq_lens=seq_lens,
        seq_lens_cpu=seq_lens,
        seq_lens_sum=int(seq_lens.sum()),
        req_pool_indices=torch.arange(1, len(totals) + 1),
        req_to_token_pool=backend.req_to_token_pool,
        extend_seq_lens=torch.tensor(extend, dtype=torch.int32),
        extend_seq_lens_cpu=list(extend),
        extend_prefix_lens=torch.tensor(prefix, dtype=torch.int32),
        extend_prefix_lens_cpu=list(prefix),
        out_cache_loc=out_loc,
        num_token_non_padded_cpu=sum(extend),  # 0.5.12's non-CP FIA path drops the padding rows
        encoder_out_cache_loc=None,
        token_to_kv_pool=pool,
        attn_cp_metadata=None,
        spec_info=None,
        attn_backend=backend,
    )
    rows = (q_rows.reshape(-1, hq * d), k_rows, v_rows)
    return backend, batch, rows, oracle


def run_case(case, rank, world):
    """``rank`` of a CP group of ``world`` processes (the group installed by use_cp_group)."""
    import torch

    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.layers.utils import cp_utils
    from sglang.srt.models.qwen3_moe import Qwen3MoeForCausalLM

    backend, batch, (q_rows, k_rows, v_rows), oracle = _case_data(case, world)
    layer = RadixAttention(num_heads=case["heads"], head_dim=case["head_dim"], scaling=case["head_dim"] ** -0.5,
                           num_kv_heads=case["kv_heads"], layer_id=0)

    errors = []

    def model(input_ids, positions, forward_batch, input_embeds=None, pp_proxy_tensors=None):
        ids = input_ids
        if forward_batch.attn_cp_metadata is not None:  # what Qwen2MoeModel.forward does
            ids = cp_utils.cp_split_and_rebuild_data(forward_batch, ids[:, None]).flatten()
        try:
            out = backend.forward_extend(q_rows[ids], k_rows[ids], v_rows[ids], layer, forward_batch)
        except Exception as exc:  # keep this rank in the collectives below; the case fails
            errors.append(f"{type(exc).__name__}: {exc}")
            out = torch.full_like(q_rows[ids], float("nan"))
        if forward_batch.attn_cp_metadata is not None:
            out = cp_utils.cp_all_gather_rerange_output(out, world, forward_batch, None)
        return out

    owner = types.SimpleNamespace(attn_cp_size=world, attn_cp_rank=rank, model=model,
                                  capture_aux_hidden_states=False, pp_group=types.SimpleNamespace(is_last_rank=False))
    backend.init_forward_metadata(batch)
    out = Qwen3MoeForCausalLM.forward(owner, batch.input_ids, batch.positions, batch)
    real = sum(case["extend"])
    err = (out[:real].double() - oracle).abs().max().item()
    split = batch.attn_cp_metadata is not None
    if errors:
        return {"ok": False, "max_err": None, "split": split, "error": errors[0]}
    return {"ok": err <= TOLERANCE, "max_err": err, "split": split}


def main(argv):
    rank, world, port = int(argv[0]), int(argv[1]), int(argv[2])
    spec = json.loads(open(argv[3]).read())
    os.environ["SGL_ACCEL_HARDWARE"] = "ascend"
    from sgl_accel.testing import standins

    standins.activate()
    import sgl_accel

    first = spec["runs"][0]["patches"]
    if first:
        sgl_accel.apply(first, allow_untested=True)  # before sglang imports: patched on import
    groups = setup(rank, world, port)
    import torch

    import sglang.srt.managers.schedule_policy  # noqa: F401  (imported by the scheduler process; patches waiting for it land)

    results = []
    for number, run in enumerate(spec["runs"]):
        if number:
            sgl_accel.revert()
            if run["patches"]:
                sgl_accel.apply(run["patches"], allow_untested=True)  # after import: patched in place
        first_result = len(results)
        for case in run["cases"]:
            try:
                result = run_case(case, *use_cp_group(groups[case["cp"]]))
            except Exception as exc:  # a failing case is a result; the other ranks must not hang on it
                result = {"ok": False, "max_err": None, "split": None,
                          "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(limit=4)}
            results.append({"run": number, "name": case["name"], **result})
            torch.distributed.barrier()
        states = {p.name: p.state for p in sgl_accel.status(run["patches"])} if run["patches"] else {}
        for result in results[first_result:]:
            result["states"] = states
    with open(argv[4], "w") as f:
        json.dump(results, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
