"""unbind / stack_or_none / get_stack_strides: values, and gradients stacked without a copy."""

import torch

from triformers.ops import get_stack_strides, stack_or_none, unbind


def test_get_stack_strides():
    x = torch.randn(3, 4, 5)
    assert get_stack_strides(x.unbind(0), 0) == x.stride()
    assert get_stack_strides(x.unbind(1), 1) == x.stride()
    assert get_stack_strides(x.unbind(2), 2) == x.stride()
    assert get_stack_strides([x[0]], 0) is None  # one tensor
    assert get_stack_strides([x[0], x[2]], 0) == (40, 5, 1)  # equally spaced, not adjacent
    assert get_stack_strides([x[0], x[1], x[0]], 0) is None  # not equally spaced
    assert get_stack_strides([x[0], torch.randn(4, 5)], 0) is None  # another storage
    assert get_stack_strides([x[0], x[1, :, :4]], 0) is None  # another shape
    assert get_stack_strides(x.unbind(0), 4) is None  # dim out of range


def test_stack_or_none_is_a_view_with_gradients():
    w = torch.randn(2, 6, 4, requires_grad=True)
    a, b = unbind(w, 0)
    s = stack_or_none([a, b], 0)
    assert s is not None and s.data_ptr() == w.data_ptr()
    torch.testing.assert_close(s, w)
    dy = torch.randn(2, 6, 4)
    (g,) = torch.autograd.grad(s, w, dy)
    torch.testing.assert_close(g, dy)
    assert stack_or_none([torch.randn(3), torch.randn(3)], 0) is None
    cols = torch.randn(3, 2)
    assert torch.equal(stack_or_none(list(cols.unbind(1)), -1), cols)  # negative dim counts from the end


def test_unbind_matches_torch_and_backward_does_not_copy():
    w = torch.randn(2, 5, 3, requires_grad=True)
    parts = unbind(w, 0)
    for p, q in zip(parts, torch.unbind(w.detach(), 0)):
        assert torch.equal(p, q)
    buf = torch.randn(2, 5, 3)  # gradients handed back as views of one buffer
    stacked = {}

    def keep(grad):
        stacked["grad"] = grad
        return grad

    w.register_hook(keep)
    torch.autograd.backward(parts, [buf[0], buf[1]])
    assert stacked["grad"].data_ptr() == buf.data_ptr()  # no torch.stack copy
    torch.testing.assert_close(w.grad, buf)


def test_unbind_backward_with_unused_output_and_negative_dim():
    w = torch.randn(4, 3, requires_grad=True)
    parts = unbind(w, -1)
    assert len(parts) == 3
    (g,) = torch.autograd.grad(parts[1].sum(), w)
    expected = torch.zeros(4, 3)
    expected[:, 1] = 1
    torch.testing.assert_close(g, expected)
