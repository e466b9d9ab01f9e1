"""Import stand-ins that let real sglang modules import on a CPU-only machine.

``activate()`` puts a meta-path finder in front of ``sys.meta_path`` that answers
every import under the stand-in roots (torch_npu, sgl_kernel_npu, sgl_kernel,
flashinfer, torchvision, aiter) with a synthetic package. Attribute access on those
packages yields *placeholders*: objects that satisfy import-time use (``from x
import y``, subclassing, attribute chains, being stored in dicts or default
arguments) but raise :class:`StandInNotImplemented` as soon as anything calls them.
A handful of kernels that the tested code paths call are wired to the reference
implementations in ``sgl_accel.testing.kernels`` (imported lazily, at call time):

* ``torch.ops.npu.npu_fused_infer_attention_score`` = ``torch_npu.npu_fused_infer_attention_score``
  (with ``.out``) and ``torch_npu._npu_fused_infer_attention_score_get_max_workspace``
  -> ``kernels.fia``; a Python-level object that passes arguments through untouched,
* ``torch.ops.npu.causal_conv1d_update`` (the AscendC op) -> ``kernels.conv1d``; a real
  ``torch.library`` op ``npu::causal_conv1d_update`` with a CPU kernel, ``conv_state``
  declared mutable (``Tensor(a!)``) in the schema,
* ``sgl_kernel_npu.mamba.causal_conv1d.causal_conv1d_update_v2``,
* ``sgl_kernel_npu.norm.split_qkv_rmsnorm_rope.split_qkv_rmsnorm_rope``,
* ``flashinfer.norm.layernorm`` -> ``kernels.indexer`` (sglang's ``LayerNorm.forward_cuda``
  imports it on CUDA; on a CPU it is never reached).

The conv1d op shows up in dispatch (``TorchDispatchMode``, ``sgl_accel.testing.opcount``)
as ``npu.causal_conv1d_update.default``; FIA does not (see ``_PythonOp``).

What the stand-ins deliberately do NOT do: install ``torch.npu`` or register an
"npu" device. sglang decides it runs on Ascend through
``sglang.srt.utils.is_npu()`` = ``hasattr(torch, "npu")`` (and ROCm through
``torch.version.hip``), evaluated into module constants such as ``_is_npu`` at
import time; tests emulate hardware explicitly by setting those constants.

Importing this module has no side effects; nothing happens until ``activate()``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
import types

__all__ = [
    "ROOTS",
    "StandInNotImplemented",
    "activate",
    "deactivate",
    "is_active",
    "is_placeholder",
]

# Top-level packages replaced by stand-ins.
ROOTS = ("torch_npu", "sgl_kernel_npu", "sgl_kernel", "flashinfer", "torchvision", "aiter")

# Attribute set on every stand-in module; a torch_npu without it is a real one.
MARKER = "__sgl_accel_standin__"

_lock = threading.RLock()
_finder = None  # the installed _StandInFinder, or None
_library = None  # torch.library.Library holding the npu:: ops we registered


class StandInNotImplemented(NotImplementedError):
    """A placeholder symbol of an import stand-in was called.

    The code under test reached an accelerator function that has no CPU reference
    implementation. Either the test took a path it should not, or the kernel needs a
    reference implementation in ``sgl_accel.testing.kernels``.
    """


def _is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def _refuse(name: str):
    raise StandInNotImplemented(
        f"{name} is an sgl_accel test stand-in placeholder with no CPU implementation; "
        "the code under test called it (sgl_accel.testing.standins)"
    )


class _Placeholder:
    """A symbol of a stand-in module. Attribute chains work; calling raises."""

    def __init__(self, qualname: str):
        object.__setattr__(self, "_qualname", qualname)
        object.__setattr__(self, "_children", {})
        object.__setattr__(self, "_class", None)
        object.__setattr__(self, MARKER, True)

    def __call__(self, *args, **kwargs):
        _refuse(self._qualname)

    def __getattr__(self, name):
        # Dunders must stay absent so that inspect, copy, pickle, typing and
        # friends see an ordinary object instead of an infinite attribute chain.
        if _is_dunder(name):
            raise AttributeError(name)
        children = self._children
        if name not in children:
            children[name] = _Placeholder(f"{self._qualname}.{name}")
        return children[name]

    def __setattr__(self, name, value):
        # Some code assigns onto library objects (e.g. config flags); keep the value.
        self._children[name] = value

    def __mro_entries__(self, bases):
        # ``class Foo(placeholder): ...`` subclasses a real class whose __init__
        # refuses, so the class statement works and only instantiation through the
        # stand-in base fails.
        if self._class is None:
            qualname = self._qualname

            def __init__(self, *args, **kwargs):
                _refuse(qualname)

            cls = type(
                qualname.rsplit(".", 1)[-1],
                (),
                {"__init__": __init__, "__module__": qualname.rsplit(".", 1)[0], MARKER: True},
            )
            object.__setattr__(self, "_class", cls)
        return (self._class,)

    def __repr__(self):
        return f"<sgl_accel stand-in placeholder {self._qualname}>"

    # Placeholders are used as dict keys / enum members at import time.
    __hash__ = object.__hash__

    def __eq__(self, other):
        return self is other


def is_placeholder(obj) -> bool:
    """True for placeholder symbols (and classes made from them) of the stand-ins."""
    return isinstance(obj, _Placeholder) or (isinstance(obj, type) and obj.__dict__.get(MARKER, False))


class _StandInModule(types.ModuleType):
    """A synthetic package: every missing public attribute is a placeholder."""

    def __getattr__(self, name):
        if _is_dunder(name):
            raise AttributeError(name)
        sub = sys.modules.get(f"{self.__name__}.{name}")
        if sub is not None:
            return sub
        value = _Placeholder(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


def _lazy_kernel(module: str, name: str, public: str):
    """A function that imports ``sgl_accel.testing.kernels.<module>.<name>`` when called."""

    def call(*args, **kwargs):
        mod = importlib.import_module(f"sgl_accel.testing.kernels.{module}")
        return getattr(mod, name)(*args, **kwargs)

    call.__name__ = public.rsplit(".", 1)[-1]
    call.__qualname__ = call.__name__
    call.__module__ = public.rsplit(".", 1)[0]
    call.__doc__ = f"Stand-in for {public}: sgl_accel.testing.kernels.{module}.{name}."
    setattr(call, MARKER, True)
    return call


class _PythonOp:
    """A torch_npu op reached through Python, forwarding its arguments untouched.

    FIA is not registered as a torch.library op on purpose: the op's schema would
    turn numpy arrays and tensors given for ``SymInt[]`` lengths into int lists, and
    the reference records the argument types callers pass (upstream review of
    #26705: the NPU op wants Python int lists)."""

    def __init__(self, public: str, module: str, name: str, **overloads: str):
        self._call = _lazy_kernel(module, name, public)
        self.default = self._call
        for overload, target in overloads.items():
            setattr(self, overload, _lazy_kernel(module, target, f"{public}.{overload}"))
        self.__name__ = public.rsplit(".", 1)[-1]
        self.__doc__ = self._call.__doc__
        setattr(self, MARKER, True)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __repr__(self):
        return f"<sgl_accel stand-in op {self.__name__}>"


_FIA = _PythonOp(
    "torch_npu.npu_fused_infer_attention_score", "fia", "npu_fused_infer_attention_score",
    out="npu_fused_infer_attention_score_out",
)
# Python-level attributes put on torch.ops.npu while active (name -> object).
_TORCH_OPS_NPU = {"npu_fused_infer_attention_score": _FIA}


def _module_attributes(fullname: str) -> dict:
    """Wired (non-placeholder) attributes of the stand-in module ``fullname``."""
    if fullname == "torch_npu":
        return {
            "npu_fused_infer_attention_score": _FIA,
            "_npu_fused_infer_attention_score_get_max_workspace": _lazy_kernel(
                "fia", "get_max_workspace", "torch_npu._npu_fused_infer_attention_score_get_max_workspace"
            ),
        }
    if fullname == "sgl_kernel_npu.mamba.causal_conv1d":
        return {
            "causal_conv1d_update_v2": _lazy_kernel(
                "conv1d", "causal_conv1d_update_v2", f"{fullname}.causal_conv1d_update_v2"
            )
        }
    if fullname == "sgl_kernel_npu.norm.split_qkv_rmsnorm_rope":
        return {
            "split_qkv_rmsnorm_rope": _lazy_kernel(
                "split_qkv", "split_qkv_rmsnorm_rope", f"{fullname}.split_qkv_rmsnorm_rope"
            )
        }
    if fullname == "flashinfer.norm":
        return {"layernorm": _lazy_kernel("indexer", "layernorm", f"{fullname}.layernorm")}
    return {}


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] not in ROOTS:
            return None
        # Every stand-in module is a package so that any submodule imports.
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        return _StandInModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []
        setattr(module, MARKER, True)
        module.__doc__ = f"sgl_accel test stand-in for {module.__name__}"
        for name, value in _module_attributes(module.__name__).items():
            setattr(module, name, value)


# ---------------------------------------------------------------------------
# torch.ops.npu: real torch.library ops with CPU kernels.

_CONV1D_SCHEMA = (
    "causal_conv1d_update(Tensor x, Tensor weight, Tensor(a!) conv_state, "
    "Tensor conv_state_indices, Tensor? bias=None, Tensor? num_accepted_tokens=None, "
    "Tensor? query_start_loc=None, bool activation_mode=False, int pad_slot_id=-1) -> Tensor"
)


def _register_npu_ops():
    import torch

    lib = torch.library.Library("npu", "FRAGMENT")
    lib.define(_CONV1D_SCHEMA)

    def conv1d_kernel(x, weight, conv_state, conv_state_indices, bias=None, num_accepted_tokens=None,
                      query_start_loc=None, activation_mode=False, pad_slot_id=-1):
        conv1d = importlib.import_module("sgl_accel.testing.kernels.conv1d")
        y = conv1d.causal_conv1d_update_ascendc(
            x, weight, conv_state, conv_state_indices, bias=bias,
            num_accepted_tokens=num_accepted_tokens, query_start_loc=query_start_loc,
            activation_mode=activation_mode, pad_slot_id=pad_slot_id,
        )
        if y.untyped_storage().data_ptr() in (x.untyped_storage().data_ptr(), conv_state.untyped_storage().data_ptr()):
            y = y.clone()
        return y

    lib.impl("causal_conv1d_update", conv1d_kernel, "CPU")
    # Shape-only kernel so the op also traces (torch.compile / fake tensors).
    lib.impl("causal_conv1d_update", lambda x, *a, **k: torch.empty_like(x), "Meta")
    return lib


# ---------------------------------------------------------------------------


def _real_torch_npu_present() -> str | None:
    """Why a real torch_npu is there, or None. Runs before anything is installed."""
    mod = sys.modules.get("torch_npu")
    if mod is not None:
        if not getattr(mod, MARKER, False):
            return f"a torch_npu without the stand-in marker is already imported ({getattr(mod, '__file__', mod)!r})"
        return None
    try:
        spec = importlib.util.find_spec("torch_npu")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and not isinstance(spec.loader, _StandInFinder):
        return f"torch_npu is importable from {spec.origin or spec.submodule_search_locations!r}"
    import torch

    if hasattr(torch, "npu"):
        return "torch.npu exists (a real torch_npu has been loaded)"
    return None


_STAND_IN_OP_NAMESPACES = ("sgl_kernel::",)
_real_register_fake = None


def _tolerate_missing_kernel_fakes(torch) -> None:
    """On a CUDA machine sglang registers fake (meta) kernels for sgl_kernel's ops at
    import time (e.g. ``sgl_kernel::moe_fused_gate`` in layers/moe/topk.py). Those
    ops exist only in the real sgl_kernel, which the stand-in replaces, so a fake
    for an op that is not defined is skipped instead of failing the import. Any
    other registration goes through unchanged."""
    global _real_register_fake
    if _real_register_fake is not None:
        return
    _real_register_fake = torch.library.register_fake

    def register_fake(op, *args, **kwargs):
        if isinstance(op, str) and op.startswith(_STAND_IN_OP_NAMESPACES):
            namespace, _, name = op.partition("::")
            if not hasattr(getattr(torch.ops, namespace), name.split(".")[0]):
                return (lambda fn: fn) if not args else None
        return _real_register_fake(op, *args, **kwargs)

    torch.library.register_fake = register_fake


def activate() -> None:
    """Install the stand-ins (idempotent). Refuses where a real torch_npu exists."""
    global _finder, _library
    with _lock:
        if _finder is not None:
            if _finder not in sys.meta_path:
                sys.meta_path.insert(0, _finder)
            return
        why = _real_torch_npu_present()
        if why:
            raise RuntimeError(
                "sgl_accel.testing.standins refuses to activate on a machine with a real torch_npu: " + why
            )
        import torch  # noqa: F401  (the ops below need it)

        if _library is None:
            _library = _register_npu_ops()
        for name, value in _TORCH_OPS_NPU.items():
            setattr(torch.ops.npu, name, value)
        _tolerate_missing_kernel_fakes(torch)
        finder = _StandInFinder()
        sys.meta_path.insert(0, finder)
        _finder = finder


def is_active() -> bool:
    return _finder is not None and _finder in sys.meta_path


def deactivate() -> None:
    """Remove the finder, the stand-in modules in sys.modules and the Python-level
    torch.ops.npu attributes (best effort: modules that already imported a stand-in
    keep their references). The torch.library op stays registered."""
    global _finder
    with _lock:
        if _finder is None:
            return
        if _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
        _finder = None
        import torch

        for name in _TORCH_OPS_NPU:
            if getattr(torch.ops.npu, name, None) is _TORCH_OPS_NPU[name]:
                delattr(torch.ops.npu, name)
        for name in [n for n, m in sys.modules.items() if n.partition(".")[0] in ROOTS]:
            if getattr(sys.modules[name], MARKER, False):
                del sys.modules[name]
