"""Count the tensor operations a piece of code runs, at the aten level.

    with OpCounter() as c:
        fn()
    c.ops["aten.cat.default"], c.allocations, c.bytes_allocated, c.bytes_written
    print(c.summary()); print(after.diff(before))

The counter is a ``TorchDispatchMode``: it sees every op below autograd (what a
backend would launch as kernels), including custom ops such as
``npu.causal_conv1d_update.default``; the ops a custom op's Python kernel runs
internally are not counted (the custom op counts as one kernel).

* ``allocations``: output tensors whose storage is not the storage of any input
  tensor of the op (fresh memory). Views and in-place / ``out=`` results share an
  input's storage and do not count.
* ``bytes_allocated``: the storage bytes of those fresh outputs.
* ``bytes_written``: ``numel * element_size`` of every output tensor that is not a
  view of an input, i.e. fresh outputs plus in-place and ``out=`` results, plus the
  arguments the schema marks as mutated (``Tensor(a!)``) that the op does not return
  (each written region counted once per op). Pure views (``view``, ``slice``, ``transpose`` …, recognised by the
  op schema's non-writing alias annotation) write nothing, and neither do the
  uninitialised factories (``empty``, ``empty_like``, ``empty_strided``,
  ``new_empty``…), which allocate only.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["OpCounter", "format_bytes"]


def format_bytes(n: int) -> str:
    """Decimal units: 9_400_000 -> '9.4 MB'."""
    n = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def _tensors(tree):
    leaves, _ = tree_flatten(tree)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _storage_key(t: torch.Tensor):
    try:
        return t.untyped_storage().data_ptr(), t.device
    except Exception:  # tensors without storage (e.g. sparse); never shared here
        return None


def _op_name(func) -> str:
    # OpOverload: namespace.name.overload, e.g. 'aten.cat.default', 'npu.causal_conv1d_update.default'.
    return f"{func.namespace}.{func._schema.name.split('::', 1)[-1]}.{func._overloadname}"


def _view_outputs(func) -> bool:
    """True when the op's outputs alias inputs without writing (view ops)."""
    for ret in func._schema.returns:
        info = ret.alias_info
        if info is None or info.is_write:
            return False
    return bool(func._schema.returns)


def _region(t: torch.Tensor):
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _mutated_args(func, args, kwargs):
    for i, arg in enumerate(func._schema.arguments):
        info = arg.alias_info
        if info is None or not info.is_write:
            continue
        if arg.kwarg_only or i >= len(args):
            value = kwargs.get(arg.name)
        else:
            value = args[i]
        yield from _tensors(value)


def _is_empty_factory(func) -> bool:
    base = func._schema.name.split("::", 1)[-1]
    return func.namespace == "aten" and base in ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided")


class OpCounter(TorchDispatchMode):
    """Counts aten-level ops, fresh allocations and bytes written while active."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.allocations = 0
        self.bytes_allocated = 0
        self.bytes_written = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops[_op_name(func)] += 1
        inputs = {_storage_key(t) for t in _tensors((args, kwargs))}
        inputs.discard(None)
        writes = not _view_outputs(func) and not _is_empty_factory(func)
        seen = set()
        written = {}
        for t in _tensors(out):
            key = _storage_key(t)
            if key is not None and key not in inputs and key not in seen:
                seen.add(key)
                self.allocations += 1
                self.bytes_allocated += t.untyped_storage().nbytes()
            if writes:
                written[_region(t)] = t.numel() * t.element_size()
        # Arguments the schema declares as mutated (Tensor(a!)) are written too,
        # also when the op does not return them (e.g. a kernel's state buffer).
        for t in _mutated_args(func, args, kwargs):
            written[_region(t)] = t.numel() * t.element_size()
        self.bytes_written += sum(written.values())
        return out

    # -- reporting -----------------------------------------------------------
    def count(self, name: str) -> int:
        """Calls of ``name``: a full overload ('aten.cat.default') or a packet
        ('aten.cat', summed over overloads)."""
        if name.count(".") >= 2:
            return self.ops.get(name, 0)
        return sum(n for op, n in self.ops.items() if op.rsplit(".", 1)[0] == name)

    def summary(self) -> str:
        top = ", ".join(f"{op} x{n}" for op, n in self.ops.most_common())
        return (
            f"{sum(self.ops.values())} ops ({top or 'none'}); {self.allocations} allocations, "
            f"{format_bytes(self.bytes_allocated)} allocated, {format_bytes(self.bytes_written)} written"
        )

    def diff(self, other: "OpCounter") -> str:
        """How ``self`` differs from ``other``, e.g. 'one aten.cat and 9.4 MB fewer'
        when self ran one cat fewer and allocated 9.4 MB less than other."""
        words = {1: "one", 2: "two", 3: "three"}
        fewer, more = [], []
        for op in sorted(set(self.ops) | set(other.ops)):
            d = self.ops.get(op, 0) - other.ops.get(op, 0)
            if d:
                label = f"{words.get(abs(d), abs(d))} {op.removesuffix('.default')}"
                (fewer if d < 0 else more).append(label)
        db = self.bytes_allocated - other.bytes_allocated
        if db < 0:
            fewer.append(format_bytes(-db))
        elif db > 0:
            more.append(format_bytes(db))
        parts = []
        if fewer:
            parts.append(_join(fewer) + " fewer")
        if more:
            parts.append(_join(more) + " more")
        return "; ".join(parts) if parts else "no difference"


def _join(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
