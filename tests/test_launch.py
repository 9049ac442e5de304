"""The direct launcher's specialisation key (triformers._triton): everything Triton's JIT specialises a
kernel on must change the key, or a compiled kernel could run with arguments it was not compiled for."""

import pytest
import torch

from triformers import _triton as T


def test_int_keys_follow_triton_specialisation():
    assert T._spec(1) != T._spec(2)  # 1 becomes a constant
    assert T._spec(16) == T._spec(32)  # both divisible by 16
    assert T._spec(16) != T._spec(24)
    assert T._spec(2**31 - 16) != T._spec(2**31)  # int32 -> int64
    assert T._spec(-16) == T._spec(16)
    assert T._spec(True) != T._spec(1)  # bool is not int
    assert T._spec(0.5) == T._spec(2.0)  # floats are not specialised
    assert T._spec(None) != T._spec(0)


def test_tensor_keys_follow_dtype_and_alignment():
    x = torch.zeros(64, dtype=torch.float16)
    assert T._spec(x) == T._spec(torch.ones(64, dtype=torch.float16))
    assert T._spec(x) != T._spec(x.float())
    assert x.data_ptr() % 16 == 0
    assert T._spec(x[1:]) != T._spec(x)  # 2-byte offset: no longer 16-byte aligned
    assert T._spec(x[8:]) == T._spec(x)  # 16-byte offset


def test_descriptor_keys_follow_block_shape():
    pytest.importorskip("triton")
    from triton.tools.tensor_descriptor import TensorDescriptor

    x = torch.zeros(2, 64, 32, dtype=torch.float16)
    a = TensorDescriptor.from_tensor(x, [1, 16, 32])
    b = TensorDescriptor.from_tensor(x, [1, 32, 32])
    c = TensorDescriptor.from_tensor(x.float(), [1, 16, 32])
    assert T._spec(a) == T._spec(TensorDescriptor.from_tensor(torch.ones_like(x), [1, 16, 32]))
    assert len({T._spec(a), T._spec(b), T._spec(c)}) == 3


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
