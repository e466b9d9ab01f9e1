"""OpCounter on small torch programs whose counts follow from the op semantics."""

import torch

from sgl_accel.testing.opcount import OpCounter, format_bytes


def _f32(*shape):
    return torch.randn(*shape, dtype=torch.float32)


def test_clone_is_one_op_one_allocation():
    x = _f32(3, 5)
    with OpCounter() as c:
        y = x.clone()
    assert dict(c.ops) == {"aten.clone.default": 1}
    assert c.allocations == 1
    assert c.bytes_allocated == x.numel() * x.element_size() == y.untyped_storage().nbytes()
    assert c.bytes_written == x.numel() * x.element_size()


def test_inplace_writes_without_allocating():
    x = torch.zeros(4, 6, dtype=torch.bfloat16)
    with OpCounter() as c:
        x.add_(1)
    assert c.count("aten.add_") == 1
    assert sum(c.ops.values()) == 1
    assert c.allocations == 0 and c.bytes_allocated == 0
    assert c.bytes_written == 4 * 6 * 2


def test_views_neither_allocate_nor_write():
    x = _f32(3, 4)
    with OpCounter() as c:
        x.view(12)
        x.t()
        x[1:]
        x[0]
    assert sum(c.ops.values()) == 4
    assert c.allocations == 0 and c.bytes_allocated == 0 and c.bytes_written == 0
    assert c.count("aten.view") == 1 and c.count("aten.t") == 1


def test_cat_and_out_variant():
    a, b = _f32(2, 3), _f32(2, 5)
    with OpCounter() as c:
        torch.cat([a, b], dim=-1)
    assert dict(c.ops) == {"aten.cat.default": 1}
    assert (c.allocations, c.bytes_allocated, c.bytes_written) == (1, 2 * 8 * 4, 2 * 8 * 4)

    out = torch.empty(2, 3)
    with OpCounter() as c:
        torch.add(a, a, out=out)
    assert c.count("aten.add") == 1
    assert c.allocations == 0
    assert c.bytes_written == out.numel() * out.element_size()


def test_multi_output_op_counts_each_fresh_output():
    x = _f32(3, 4)
    with OpCounter() as c:
        values, indices = torch.max(x, dim=0)
    assert sum(c.ops.values()) == 1
    assert c.allocations == 2
    expected = values.numel() * values.element_size() + indices.numel() * indices.element_size()
    assert c.bytes_allocated == expected == 4 * 4 + 4 * 8
    assert c.bytes_written == expected


def test_empty_allocates_but_writes_nothing():
    with OpCounter() as c:
        torch.empty(5)
    assert c.allocations == 1 and c.bytes_allocated == 20 and c.bytes_written == 0


def test_counts_below_autograd():
    x = _f32(4).requires_grad_()
    with OpCounter() as c:
        y = (x * 2).sum()
    assert c.count("aten.mul") == 1 and c.count("aten.sum") == 1
    assert y.requires_grad


_lib = None


def _custom_op():
    """A custom op whose Python kernel runs two aten ops internally."""
    global _lib
    if _lib is None:
        _lib = torch.library.Library("sgl_accel_opcount_test", "FRAGMENT")
        _lib.define("twice(Tensor x) -> Tensor")
        _lib.impl("twice", lambda x: x.clone().mul_(2), "CPU")
    return torch.ops.sgl_accel_opcount_test.twice


def test_custom_op_counted_as_one_kernel():
    op = _custom_op()
    x = _f32(3)
    with OpCounter() as c:
        y = op(x)
    assert dict(c.ops) == {"sgl_accel_opcount_test.twice.default": 1}
    assert c.allocations == 1 and c.bytes_written == 12
    assert torch.equal(y, x * 2)


def test_diff_and_summary():
    q_nope, q_rope = _f32(4, 2, 16), _f32(4, 2, 8)
    with OpCounter() as with_cat:
        torch.cat([q_nope, q_rope], dim=-1)
    with OpCounter() as without:
        torch.cat([q_nope, q_rope], dim=-1).view(4, -1)  # same work plus a view ...
        q_nope.view(8, 16)
    with OpCounter() as nothing:
        q_nope.view(8, 16)
    nbytes = 4 * 2 * 24 * 4
    assert nothing.diff(with_cat) == f"one aten.cat and {format_bytes(nbytes)} fewer; one aten.view more"
    # "fewer" always comes first.
    assert with_cat.diff(nothing) == f"one aten.view fewer; one aten.cat and {format_bytes(nbytes)} more"
    assert without.diff(without) == "no difference"
    assert "aten.cat.default x1" in with_cat.summary()
    assert "1 allocations" in with_cat.summary()


def test_format_bytes():
    assert format_bytes(9_400_000) == "9.4 MB"
    assert format_bytes(512) == "512 B"
    assert format_bytes(1_500) == "1.5 kB"


def test_mutated_argument_counts_as_written():
    lib = torch.library.Library("sgl_accel_opcount_test2", "FRAGMENT")
    lib.define("bump(Tensor x, Tensor(a!) state) -> Tensor")

    def bump(x, state):
        state.add_(1)
        return x + state.sum()

    lib.impl("bump", bump, "CPU")
    x, state = _f32(5), torch.zeros(2, 3, dtype=torch.float64)
    with OpCounter() as c:
        torch.ops.sgl_accel_opcount_test2.bump(x, state)
    assert dict(c.ops) == {"sgl_accel_opcount_test2.bump.default": 1}
    assert c.allocations == 1 and c.bytes_allocated == 5 * 4
    assert c.bytes_written == 5 * 4 + 6 * 8
    assert torch.equal(state, torch.ones(2, 3, dtype=torch.float64))
