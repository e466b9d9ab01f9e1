"""Several prefill requests per context-parallel batch on Ascend (upstream #23269). OPT-IN.

What: 0.5.11 and 0.5.12.post1 force CP prefill to one request per batch twice, in the
scheduler (``PrefillAdder.add_one_req`` stops after one request whenever prefill CP is on) and
in the model (``can_cp_split`` needs ``seq_lens_cpu.shape[0] == 1``). With this patch an
Ascend operator running a non-MLA model with ``--enable-prefill-context-parallel`` and
``ASCEND_USE_FIA=1`` (Qwen3-MoE: ``Qwen3MoeForCausalLM`` is the model that builds CP
metadata in these releases) gets several prefill requests per CP batch, as upstream 0.5.13
does, without upgrading.

How:
* ``PrefillAdder.add_one_req``: a further request joins a CP prefill batch only when every
  request of the batch qualifies for the CP split (its extend part, after host-cache load and
  chunking, has at least ``2 * cp_size`` tokens), the zigzag (in-seq-split) mode is used (the
  NSA/DSA CP path stays at one request), mixed chunked prefill is off (a mixed batch is not
  split), and the batched pieces below are in place. Otherwise the release's rule holds. On
  0.5.11 a batch that is not split falls back to the plain FIA extend path, which ignores
  cached prefixes there (a separate fix, ``ascend-fia-extend-prefix``); admitting only
  qualifying requests keeps batching from sending a request there.
* ``can_cp_split``: a batch of several sequences is split when every sequence has at least
  ``2 * cp_size`` extend tokens, the mode is not MIXED and the batched pieces are in place; a
  single sequence is judged exactly as in the release.
* ``cp_all_gather_reorganized_into_tensor`` / ``..._kv_cache``: the all-gather pads each rank's
  share to ``max_rank_len`` of the metadata (the largest share) instead of ``ceil(total/cp)``,
  which one rank's share exceeds once several sequences are split. For one sequence the two are
  equal (the release's own ``max_rank_len`` is ``ceil(total/cp)``).

The batched pieces this needs, checked before each admission (never batching silently on a
half-patched install; a warning says once what is missing): the per-sequence metadata builder
of ``ascend-cp-padding`` (applied by default) and the per-sequence ``do_cp_attn_fia`` of
``ascend-cp-attn-batch`` (#26705, applied by default). Opt in by naming all three:
``SGL_ACCEL=ascend-cp-padding,ascend-cp-attn-batch,ascend-cp-prefill-batch`` (plus any other
patch you want), or ``sgl_accel.apply([...])`` with those names.

Opt-in: it changes scheduling and has not been run on an NPU (HCCL, and the real FIA kernel
with batched TND paged input). It stays opt-in until someone has. Tested on CPU with the
release's own code path over gloo (tests/test_cp_prefill_multiprocess.py).

Releases, from the scanner: 0.5.11 and 0.5.12.post1; 0.5.13.post1 has the change (upstream).
Drop this patch when no supported install is older than 0.5.13.
"""

from sgl_accel._registry import Part, Patch, Target
from sgl_accel._rewrite import Rule

NAME = "ascend-cp-prefill-batch"
CP_UTILS_MODULE = "sglang.srt.layers.utils.cp_utils"
SCHEDULE_POLICY_MODULE = "sglang.srt.managers.schedule_policy"
BACKEND_MODULE = "sglang.srt.hardware_backend.npu.attention.ascend_backend"
# The patches whose rewrites a batch of several sequences needs (their functions carry the
# loader's patch mark).
NEEDS = {
    (CP_UTILS_MODULE, "prepare_context_parallel_metadata"): "ascend-cp-padding",
    (BACKEND_MODULE, "AscendAttnBackend.do_cp_attn_fia"): "ascend-cp-attn-batch",
}


def _helpers():
    import logging
    import sys

    from sgl_accel._loader import PATCH_MARK
    from sglang.srt.server_args import get_global_server_args

    logger = logging.getLogger("sgl_accel")
    warned = []

    def _function(module_name, qualname):
        owner = sys.modules.get(module_name)
        for part in qualname.split("."):
            owner = getattr(owner, part, None)
        return owner

    def _sgl_accel_cp_batching_ready():
        """Whether the per-sequence metadata builder and CP attention are the ones in place."""
        missing = [name for (module, qualname), name in NEEDS.items() if getattr(_function(module, qualname), PATCH_MARK, None) != name]
        if missing and not warned:
            warned.append(True)
            logger.warning("sgl-accel: %s needs %s applied; CP prefill stays at one request per batch", NAME, ", ".join(missing))
        return not missing

    def _sgl_accel_cp_split_batch_ok(forward_batch, cp_size):
        """can_cp_split's batch rule: one sequence as the release; several when every one can be split."""
        if forward_batch.seq_lens_cpu.shape[0] == 1:
            return True
        if forward_batch.forward_mode.is_mixed() or not forward_batch.extend_seq_lens_cpu:
            return False
        return min(forward_batch.extend_seq_lens_cpu) >= 2 * cp_size and _sgl_accel_cp_batching_ready()

    def _extend_after_admission(adder, req):
        """The extend tokens ``req`` will run with: host-cache hits load back, chunking may cut."""
        extend = req.extend_input_len - req.host_hit_length
        if adder.rem_chunk_tokens is not None and adder.ceil_paged_tokens(extend) > adder.rem_chunk_tokens:
            extend = adder.rem_chunk_tokens // adder.page_size * adder.page_size
        return extend

    def _sgl_accel_cp_batch_admits(adder, req):
        """Whether ``req`` may join a non-empty CP prefill batch: every request must qualify for the split."""
        args = get_global_server_args()
        if adder.nsa_prefill_cp_in_seq_split or not adder.prefill_context_parallel_enabled:
            return False
        if args.enable_mixed_chunk or getattr(args, "prefill_cp_mode", "in-seq-split") != "in-seq-split":
            return False
        need = 2 * args.attn_cp_size
        if _extend_after_admission(adder, req) < need or any(r.extend_input_len < need for r in adder.can_run_list):
            return False
        return _sgl_accel_cp_batching_ready()

    return {
        "_sgl_accel_cp_split_batch_ok": _sgl_accel_cp_split_batch_ok,
        "_sgl_accel_cp_batch_admits": _sgl_accel_cp_batch_admits,
    }


_GATHER_PAD = Rule(
    "pad each rank's share to the largest one of the metadata",
    find="max_len = (total_len + cp_size - 1) // cp_size",
    replace="max_len = forward_batch.attn_cp_metadata.max_rank_len[0]",
)
_GATHER_UPSTREAM = ["max_len = forward_batch.attn_cp_metadata.max_rank_len[0]"]

PATCH = Patch(
    name=NAME,
    upstream_pr="#23269",
    kind="feature",
    summary=(
        "Ascend CP prefill with several requests per batch (opt-in; needs ascend-cp-padding and "
        "ascend-cp-attn-batch): scheduler admits requests that all qualify for the zigzag split"
    ),
    hardware=("ascend",),
    releases=">=0.5.11",  # no Ascend CP attention before 0.5.11
    opt_in=True,
    parts=[
        Part(
            "cp-batch",
            [
                Target(
                    SCHEDULE_POLICY_MODULE,
                    "PrefillAdder.add_one_req",
                    rules=[
                        Rule(
                            "a CP prefill batch takes further requests that all qualify for the split",
                            find="(self.nsa_prefill_cp_in_seq_split or self.prefill_context_parallel_enabled) and len(self.can_run_list) >= 1",
                            replace=(
                                "(self.nsa_prefill_cp_in_seq_split or self.prefill_context_parallel_enabled) "
                                "and len(self.can_run_list) >= 1 and not _sgl_accel_cp_batch_admits(self, req)"
                            ),
                        )
                    ],
                    upstream=["__s.dsa_prefill_cp_in_seq_split and len(__s.can_run_list) >= 1"],
                ),
                Target(
                    CP_UTILS_MODULE,
                    "can_cp_split",
                    rules=[
                        Rule(
                            "several sequences split when each can be",
                            find="forward_batch.seq_lens_cpu.shape[0] == 1",
                            replace="_sgl_accel_cp_split_batch_ok(forward_batch, cp_size)",
                        )
                    ],
                    upstream=["getattr(forward_batch, 'extend_seq_lens_cpu', None)"],
                ),
                Target(CP_UTILS_MODULE, "cp_all_gather_reorganized_into_tensor", rules=[_GATHER_PAD], upstream=_GATHER_UPSTREAM),
                Target(CP_UTILS_MODULE, "cp_all_gather_reorganized_into_tensor_kv_cache", rules=[_GATHER_PAD], upstream=_GATHER_UPSTREAM),
            ],
        )
    ],
    helpers=_helpers,
)
