"""Equivalence cases for ``nsa-indexer-fusion`` (the ``rope-writeback`` part:
``Indexer._get_q_k_bf16`` and ``Indexer._get_k_bf16``).

A case builds a real ``Indexer`` with its own ``__init__`` (real ``ReplicatedLinear``
projections, ``LayerNorm``, and the RoPE module sglang's factory picks), under a bf16
default dtype as sglang's model loader builds it, with seeded weights, and runs the
original and the patched method on the same inputs. Outputs must be bit-identical: the
patch only changes how the rotated slice is written back, never the arithmetic.

Two RoPE paths, chosen per case on the real rotary module:

* ``inplace``: ``forward_cuda``, whose kernel rotates the ``q_rope``/``k_rope`` views
  in place and returns them (the CUDA path of both RoPE classes, the ROCm path of the
  plain one): the write-back source IS its destination.
* ``native``: ``forward_native``, which returns fresh tensors (ROCm's path for the
  DeepSeek-YaRN class, and every RoPE under sglang's torch.compile mode).

RoPE configurations: ``deepseek_yarn`` (DeepSeek V3.2's indexer) and ``none`` (the
plain ``RotaryEmbedding``, as GLM-5 builds it). The DeepSeek-YaRN ``forward_native`` of
the releases broadcasts a 2-D key against its ``(1, T, 1, R)`` cos table, so with it
the indexer's 2-D key only works for one token; its native cases use ``tokens=1``
(whose result then carries leading unit dimensions, which ``x[...] = v`` drops).

On a CPU the RoPE constructor runs with sglang's CPU-engine flag
(``rotary_embedding.base._is_cpu``), set only while the Indexer is built.

Stand-ins only for what needs a running server: the global ``ServerArgs`` (made from
the dataclass defaults without ``__post_init__``, which would resolve a model and a
device; set only while the Indexer is built, and only when no server set one) and the
``ForwardBatch`` (the two context-parallel metadata fields these methods read).

Kernels: without the test bed, the release's own (``sglang.jit_kernel`` RoPE and
Hadamard on CUDA; ``sgl_kernel``'s RoPE and ``fast_hadamard_transform`` on ROCm); nothing
is replaced. When the test bed is active (``sgl_accel.testing.standins.is_active()``:
the tests, ``sgl-accel verify --emulate``, ``sgl-accel bench --emulate``), each call of
a method (``call``: the cases, the bench pairs, the tests' op counts) puts the
references of ``sgl_accel.testing.kernels.indexer`` where the release's code looks its
kernels up, and restores what was there when the call returns:

* ``apply_rope_with_cos_sin_cache_inplace`` in the globals of the rotary class's
  ``forward_cuda`` (``rotary_embedding.base``; the release imports it there only on CUDA);
* ``hadamard_transform`` on ``sglang.jit_kernel.hadamard``, which ``rotate_activation``
  imports from at each call on CUDA (the ROCm branch's ``fast_hadamard_transform`` has
  no reference: no case emulates ROCm's ``_is_hip``).

flashinfer's layernorm (``k_norm`` on CUDA) is a stand-in wired by the test bed itself.
On a CUDA machine without DeepGEMM, the indexer module's ``deep_gemm`` is the
ImportError it caught, and ``Indexer.__init__`` asks it for the SM count: with the test
bed active, ``build`` answers that from the device's properties while it builds (the
count only sizes DeepGEMM, which is then disabled).

``evaluate`` compares the installed pair when the patch is applied (the original is the
patched function's ``__sgl_accel_original__``); otherwise it builds the form the loader
would install, without installing it. ``BENCH`` times one call of each method at
DeepSeek V3.2 sizes with the in-place RoPE (``sgl-accel bench``, on a CUDA GPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import types
from dataclasses import dataclass
from functools import partial
from typing import Optional

from . import Case, Comparison, compare

PATCH_NAME = "nsa-indexer-fusion"
MODULE = "sglang.srt.layers.attention.nsa.nsa_indexer"
METHODS = ("_get_q_k_bf16", "_get_k_bf16")
ROPE_PATHS = ("inplace", "native")


@dataclass(frozen=True)
class Spec:
    method: str  # "_get_q_k_bf16" | "_get_k_bf16"
    rope: str  # "inplace" (forward_cuda) | "native" (forward_native)
    tokens: int = 5
    scaling: str = "deepseek_yarn"  # or "none": the plain RotaryEmbedding
    neox: bool = True
    dual_stream: bool = False  # CUDA only: the enable_dual_stream branch
    heads: int = 4
    head_dim: int = 128  # power of two (Hadamard)
    rope_dim: int = 64
    q_lora_rank: int = 64
    hidden: int = 64
    original_max_position: int = 128  # YaRN: cache length = this x factor
    factor: float = 4.0
    dtype: str = "bfloat16"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}")
        if self.rope not in ROPE_PATHS:
            raise ValueError(f"rope must be one of {ROPE_PATHS}")
        if self.scaling not in ("deepseek_yarn", "none"):
            raise ValueError("scaling must be 'deepseek_yarn' or 'none'")

    @classmethod
    def deepseek_v32(cls, method: str, rope: str = "inplace", tokens: int = 128, **kw) -> "Spec":
        """DeepSeek V3.2's indexer sizes (for benchmarks on a GPU)."""
        sizes = dict(heads=64, head_dim=128, rope_dim=64, q_lora_rank=1536, hidden=7168,
                     original_max_position=4096, factor=40.0)
        return cls(method, rope, tokens, **{**sizes, **kw})

    @property
    def max_position(self) -> int:
        return int(self.original_max_position * self.factor)

    def rope_scaling(self) -> Optional[dict]:
        if self.scaling == "none":
            return None
        return {"rope_type": "deepseek_yarn", "factor": self.factor, "beta_fast": 32, "beta_slow": 1,
                "mscale": 1.0, "mscale_all_dim": 1.0,
                "original_max_position_embeddings": self.original_max_position}

    def label(self) -> str:
        extra = "" if self.neox else "-gptj"
        extra += "-dual-stream" if self.dual_stream else ""
        return f"{self.method.lstrip('_')}-{self.rope}-{self.scaling}-T{self.tokens}{extra}"


@dataclass
class Bed:
    spec: Spec
    module: types.ModuleType
    indexer: object
    q_lora: object
    x: object
    positions: object
    forward_batch: object
    device: str
    kernels: list = dataclasses.field(default_factory=list)  # reference_kernels(): installed per call


def _torch():
    import torch

    return torch


def default_device() -> str:
    torch = _torch()
    return "cuda" if torch.cuda.is_available() else "cpu"  # ROCm builds answer here too


@contextlib.contextmanager
def _server_args(device_type: str, scaling: str):
    """Global server args for the constructors, when no server set them."""
    from sglang.srt import server_args as sa

    if getattr(sa, "_global_server_args", None) is not None:
        yield sa._global_server_args
        return
    args = object.__new__(sa.ServerArgs)
    for f in dataclasses.fields(sa.ServerArgs):
        if f.default is not dataclasses.MISSING:
            setattr(args, f.name, f.default)
        elif f.default_factory is not dataclasses.MISSING:
            setattr(args, f.name, f.default_factory())
    # The Indexer hands ``device`` to the RoPE factory: "cpu" selects sglang's CPU
    # engine factory, which only builds the DeepSeek-YaRN class. For the plain class on
    # a CPU the device stays unresolved (None), which takes the GPU factory.
    if device_type != "cpu":
        args.device = device_type
    elif scaling == "deepseek_yarn":
        args.device = "cpu"
    args.pp_size = 1
    sa.set_global_server_args_for_scheduler(args)
    try:
        yield args
    finally:
        sa._global_server_args = None


@contextlib.contextmanager
def _cpu_engine(device_type: str):
    """On a CPU, the RoPE constructor's platform flag as sglang's CPU engine sets it
    (SGLANG_USE_CPU_ENGINE=1); without it ``RotaryEmbedding.__init__`` takes the
    GPU-less fallback and imports ``vllm._custom_ops``."""
    if device_type != "cpu":
        yield
        return
    base = importlib.import_module("sglang.srt.layers.rotary_embedding.base")
    saved = base._is_cpu
    base._is_cpu = True
    try:
        yield
    finally:
        base._is_cpu = saved


@contextlib.contextmanager
def _default_dtype(dtype):
    torch = _torch()
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _test_bed_active() -> bool:
    """Whether sgl_accel's test bed (its import stand-ins) is active in this process."""
    from sgl_accel.testing import standins  # no side effects until activate()

    return standins.is_active()


@contextlib.contextmanager
def _installed(entries: list):
    """Set ``namespace[name] = value`` for each (namespace, name, value) for the block;
    afterwards restore what was there (or remove what was not)."""
    missing = object()
    saved = [(namespace, name, namespace.get(name, missing)) for namespace, name, _ in entries]
    try:
        for namespace, name, value in entries:
            namespace[name] = value
        yield
    finally:
        for namespace, name, old in reversed(saved):
            if old is missing:
                namespace.pop(name, None)
            else:
                namespace[name] = old


def reference_kernels(rotary) -> list:
    """(namespace, name, reference) for each kernel look-up the test bed redirects while
    a method runs (module docstring); empty when the test bed is not active."""
    if not _test_bed_active():
        return []
    from sgl_accel.testing.kernels import indexer as ref

    jit_hadamard = importlib.import_module("sglang.jit_kernel.hadamard")
    return [
        (type(rotary).forward_cuda.__globals__, "apply_rope_with_cos_sin_cache_inplace",
         ref.apply_rope_with_cos_sin_cache_inplace),
        (vars(jit_hadamard), "hadamard_transform", ref.hadamard_transform),
    ]


def _construction_standins(module, device: str) -> list:
    """What ``Indexer.__init__`` needs from an absent DeepGEMM on CUDA (module docstring)."""
    torch = _torch()
    if torch.device(device).type != "cuda" or not isinstance(vars(module).get("deep_gemm"), BaseException):
        return []
    if not _test_bed_active():
        return []  # a real install without DeepGEMM: the release's own failure, untouched
    sms = torch.cuda.get_device_properties(torch.device(device)).multi_processor_count
    return [(vars(module), "deep_gemm", types.SimpleNamespace(get_num_sms=lambda: sms))]


def build(spec: Spec, seed: int, device: Optional[str] = None) -> Bed:
    """A real Indexer and seeded inputs for one call of ``spec.method``."""
    torch = _torch()
    device = str(device or default_device())
    device_type = torch.device(device).type
    if spec.dual_stream and device_type != "cuda":
        raise ValueError("the dual-stream branch needs CUDA streams")
    module = importlib.import_module(MODULE)
    dtype = getattr(torch, spec.dtype)
    with _server_args(device_type, spec.scaling), _cpu_engine(device_type), _default_dtype(dtype), \
            _installed(_construction_standins(module, device)):
        indexer = module.Indexer(
            hidden_size=spec.hidden,
            index_n_heads=spec.heads,
            index_head_dim=spec.head_dim,
            rope_head_dim=spec.rope_dim,
            index_topk=16,
            q_lora_rank=spec.q_lora_rank,
            max_position_embeddings=spec.max_position,
            rope_theta=10000.0,
            layer_id=0,
            scale_fmt="ue8m0",
            rope_scaling=spec.rope_scaling(),
            is_neox_style=spec.neox,
            alt_stream=torch.cuda.Stream() if spec.dual_stream else None,
        )
    gen = torch.Generator().manual_seed(seed)

    def normal(shape, scale, dtype):
        return (torch.randn(shape, generator=gen, dtype=torch.float32) * scale).to(dtype)

    with torch.no_grad():
        for name, param in indexer.named_parameters():
            if param.dim() == 2:  # projections: unit-variance outputs
                param.copy_(normal(param.shape, param.shape[1] ** -0.5, param.dtype))
            elif name.endswith("weight"):  # norm scale around 1
                param.copy_(1.0 + normal(param.shape, 0.1, param.dtype))
            else:
                param.copy_(normal(param.shape, 0.1, param.dtype))
    indexer = indexer.to(device)
    q_lora = normal((spec.tokens, spec.q_lora_rank), 1.0, dtype).to(device)
    x = normal((spec.tokens, spec.hidden), 1.0, dtype).to(device)
    positions = torch.randint(0, spec.max_position, (spec.tokens,), generator=gen).to(device)
    # The scheduler-side fields the two methods read (no context parallelism).
    forward_batch = types.SimpleNamespace(nsa_cp_metadata=None, attn_cp_metadata=None)
    kernels = reference_kernels(indexer.rotary_emb)
    return Bed(spec, module, indexer, q_lora, x, positions, forward_batch, device, kernels)


@contextlib.contextmanager
def rope_path(rotary, path: str):
    """Run the real rotary module through ``forward_cuda`` or ``forward_native``.

    sglang caches RoPE modules across layers (``_ROPE_DICT``), so the choice is undone."""
    if path == "inplace":
        needs = "apply_rope_with_cos_sin_cache_inplace"
        if not getattr(rotary, "use_fallback_kernel", False) and needs not in type(rotary).forward_cuda.__globals__:
            raise RuntimeError(
                f"{type(rotary).__name__}.forward_cuda has no in-place RoPE kernel here ({needs} is only "
                "imported on CUDA): run with the test bed active (sgl-accel verify/bench --emulate) for its "
                "reference kernel"
            )
        method = rotary.forward_cuda
    else:
        method = rotary.forward_native
    saved = rotary.__dict__.get("_forward_method")
    rotary._forward_method = method
    try:
        yield
    finally:
        rotary._forward_method = saved


def functions(method: str, module=None) -> tuple:
    """(original, patched) ``Indexer.<method>``: the installed pair when the patch is
    applied, else the installed original and the form the loader would install (built
    from the installed source, installed nowhere)."""
    module = module or importlib.import_module(MODULE)
    current = module.Indexer.__dict__[method]
    original = getattr(current, "__sgl_accel_original__", None)
    if original is not None:
        return original, current
    return current, build_patched(method)


def build_patched(method: str):
    """The patched method, compiled as the loader compiles it, not installed anywhere."""
    from sgl_accel.seams import patched_forms

    forms = patched_forms(PATCH_NAME)
    return next(patched for key, (_, patched) in forms.items() if key.endswith(f":Indexer.{method}"))


def inputs(bed: Bed) -> tuple:
    """Fresh copies of the method's arguments (the methods do not write them; copies
    keep the two runs independent all the same)."""
    spec = bed.spec
    if spec.method == "_get_q_k_bf16":
        return (bed.q_lora.clone(), bed.x.clone(), bed.positions.clone(), spec.dual_stream, bed.forward_batch)
    return (bed.x.clone(), bed.positions.clone(), spec.dual_stream)


def call(bed: Bed, fn, args: Optional[tuple] = None, sync: bool = True) -> tuple:
    """One call of ``fn`` (the original or the patched method) on ``args`` (default:
    fresh inputs), through the case's RoPE path, with the test bed's reference kernels
    in place for the call when it is active. Returns the outputs as a tuple."""
    torch = _torch()
    args = inputs(bed) if args is None else args
    with _installed(bed.kernels), torch.no_grad(), rope_path(bed.indexer.rotary_emb, bed.spec.rope):
        out = fn(bed.indexer, *args)
    if sync and torch.device(bed.device).type == "cuda":
        torch.cuda.synchronize()
    return tuple(out) if isinstance(out, tuple) else (out,)


def evaluate(spec: Spec, seed: int, device: Optional[str] = None) -> list:
    bed = build(spec, seed, device)
    original, patched = functions(spec.method, bed.module)
    expected = call(bed, original)
    actual = call(bed, patched)
    names = ("query", "key") if spec.method == "_get_q_k_bf16" else ("key",)
    if len(actual) != len(names) or len(expected) != len(names):
        return [Comparison("outputs", float("inf"), 0.0, True, f"{len(actual)} vs {len(expected)} outputs")]
    return [compare(name, a, e, exact=True, note="patched vs original") for name, a, e in zip(names, actual, expected)]


def specs_for(device: Optional[str] = None) -> list:
    """The case list; a CUDA device adds the dual-stream branch."""
    specs = []
    for method in METHODS:
        specs += [
            Spec(method, "inplace", tokens=7),
            Spec(method, "native", tokens=1),  # see the module docstring
            Spec(method, "inplace", tokens=6, scaling="none"),
            Spec(method, "native", tokens=6, scaling="none"),
        ]
    specs.append(Spec("_get_q_k_bf16", "inplace", tokens=3, neox=False))
    if device is not None and device.split(":")[0] == "cuda":
        specs.append(Spec("_get_q_k_bf16", "inplace", tokens=9, dual_stream=True))
    return specs


def _run(spec: Spec, device: Optional[str], seed: int) -> list:
    return evaluate(spec, seed, device)


def cases_for(device: Optional[str] = None) -> list:
    """Cases on ``device``; None: the machine's device, chosen when a case runs."""
    return [
        Case(PATCH_NAME, spec.label(), partial(_run, spec, device),
             "Indexer RoPE write-back: patched vs original query/key, bit for bit")
        for spec in specs_for(device)
    ]


CASES = cases_for()


# --------------------------------------------------------------------------- bench


def bench_pair(spec: Spec, device: str, seed: int = 0) -> tuple:
    """(original, patched): zero-argument callables, one call of ``spec.method`` each, on
    the same inputs (the methods do not write them)."""
    bed = build(spec, seed, device)
    original, patched = functions(spec.method, bed.module)
    args = inputs(bed)
    return (lambda: call(bed, original, args, sync=False)), (lambda: call(bed, patched, args, sync=False))


def _bench_cases() -> list:
    try:
        from sgl_accel._bench import BenchCase
    except ImportError:  # an sgl_accel without the bench module
        return []
    specs = [
        Spec.deepseek_v32("_get_q_k_bf16", "inplace", tokens=1),
        Spec.deepseek_v32("_get_q_k_bf16", "inplace", tokens=64),
        Spec.deepseek_v32("_get_q_k_bf16", "inplace", tokens=2048),
        Spec.deepseek_v32("_get_k_bf16", "inplace", tokens=2048),
    ]
    return [
        BenchCase(PATCH_NAME, spec.label(), partial(bench_pair, spec),
                  f"Indexer.{spec.method}, DeepSeek V3.2 sizes, {spec.tokens} tokens, in-place RoPE (the CUDA path)")
        for spec in specs
    ]


BENCH: list = _bench_cases()
