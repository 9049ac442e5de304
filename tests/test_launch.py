"""The direct launcher's specialisation key (triformers._triton): everything Triton's JIT specialises a
kernel on must change the key, or a compiled kernel could run with arguments it was not compiled for."""

import pytest
import torch

from triformers import _triton as T


def _check_refines_triton(values):
    """Whenever Triton specialises two arguments differently, their launch keys differ too."""
    pytest.importorskip("triton")
    for a in values:
        for b in values:
            if T.triton_specialization(a) != T.triton_specialization(b):
                assert T._spec(a) != T._spec(b), (a, b, T.triton_specialization(a), T.triton_specialization(b))


def test_scalar_keys_refine_triton_specialisation():
    _check_refines_triton([0, 1, 2, 15, 16, 24, 32, -16, 2**31 - 16, 2**31, 2**40, 2**63, True, False, 0.5,
                           2.0, None])
    assert T._spec(16) == T._spec(32)  # and the key is no finer than needed for ints
    assert T._spec(0.5) == T._spec(2.0)


def test_tensor_keys_refine_triton_specialisation():
    x = torch.zeros(64, dtype=torch.float16)
    assert x.data_ptr() % 16 == 0
    _check_refines_triton([x, x[1:], x[8:], x.float(), x.float()[1:], x.to(torch.bfloat16), x.int()])
    assert T._spec(x[8:]) == T._spec(x)


def test_descriptor_keys_follow_block_shape():
    pytest.importorskip("triton")
    from triton.tools.tensor_descriptor import TensorDescriptor

    x = torch.zeros(2, 64, 32, dtype=torch.float16)
    a = TensorDescriptor.from_tensor(x, [1, 16, 32])
    b = TensorDescriptor.from_tensor(x, [1, 32, 32])
    c = TensorDescriptor.from_tensor(x.float(), [1, 16, 32])
    assert T._spec(a) == T._spec(TensorDescriptor.from_tensor(torch.ones_like(x), [1, 16, 32]))
    _check_refines_triton([a, b, c])


def test_cdiv():
    assert [T.cdiv(n, 16) for n in (0, 1, 16, 17, 33)] == [0, 1, 1, 2, 3]


def test_launch_takes_the_jit_path_under_the_interpreter(monkeypatch):
    """Under TRITON_INTERPRET=1 (the CPU suite) every launch goes through kernel[grid]."""
    calls = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **meta: calls.append((grid, args, meta)) or "compiled"

    monkeypatch.setattr(T, "_FAST_LAUNCH", None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert T.launch(Kernel(), (3,), (1, 2), {"BLOCK": 16}) == "compiled"
    assert calls == [((3,), (1, 2), {"BLOCK": 16})]
