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


def test_launch_key_is_the_per_argument_spec():
    """The launch key built in one loop tells argument tuples apart exactly when ``_spec`` does, including
    tuples whose arguments are of different kinds at the same position."""
    x = torch.zeros(64, dtype=torch.float16)
    w = torch.nn.Parameter(torch.ones(8))
    values = [x, x[1:], x[8:], x.float(), x.to(torch.bfloat16), w, 0, 1, 2, 16, 32, -16, 2**31, 2**63, True, False,
              0.5, 2.0, None, torch.float16, "s"]
    tuples = [(a, b) for a in values for b in values] + [(a,) for a in values] + [(x, 1, 0.5), (1, x, 0.5)]
    specs = [tuple(map(T._spec, t)) for t in tuples]
    keys = [T._key(t) for t in tuples]
    for i in range(len(tuples)):
        for j in range(len(tuples)):
            assert (keys[i] == keys[j]) == (specs[i] == specs[j]), (tuples[i], tuples[j])


def test_int_code_is_the_key_entry():
    for a in (0, 1, 2, 15, 16, -16, 2**31 - 1, 2**31, 2**40, 2**63 - 1, 2**63):
        assert T._key((a,)) == (T.int_code(a),)


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


@pytest.mark.parametrize(
    "n_regs, shared, num_warps, expected",
    [
        (128, 0, 4, 4),  # 16 registers x 32 lanes x 4 warps = 16K of the SM's 64K
        (118, 0, 4, 4),  # rounded up to 120 per thread (units of 256 per warp): 15360 per program
        (137, 31488, 4, 3),  # 144 per thread: 18432 per program, 3 fit (not the 4 a split sized for 4 assumes)
        (255, 0, 4, 2),
        (80, 58368, 4, 3),  # shared memory bounds it: 57 KiB + the 1 KiB every block reserves, 228 KiB per SM
        (64, 0, 8, 4),  # threads bound it too: 2048 per SM
        (16, 0, 1, 32),  # at most 32 blocks
        (255, 300000, 8, 1),  # never 0
    ],
)
def test_programs_per_sm_follows_the_occupancy_rules(n_regs, shared, num_warps, expected):
    assert T.programs_per_sm(n_regs, shared, num_warps) == expected


def test_split_k_sized_for_the_programs_that_fit():
    from triformers.ops.fmha._triton.splitk_launch import PROGRAMS_PER_SM, split_for

    # B = 1, 8 K/V heads, 131072 keys, 4 query rows: 4 x 132 / 8 = 66 splits, 3 per SM 49, never above the table's 4
    assert split_for(8, 131072, 4, sms=132) == 66
    assert split_for(8, 131072, 4, sms=132, per_sm=3) == 49
    assert PROGRAMS_PER_SM == 4 and split_for(8, 131072, 4, sms=132, per_sm=8) == 66


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


class _FakeRun:
    global_scratch_size = profile_scratch_size = 0
    launch_cooperative_grid = launch_pdl = False

    def __init__(self):
        self.calls = []

    def launch(self, *args):
        self.calls.append(args)


class _FakeKernel:
    """Stands for a JITFunction: ``kernel[grid](*args, **meta)`` counts JIT-path calls and returns a
    compiled kernel whose C launcher records its arguments."""

    class _Param:
        def __init__(self, name, default=None):
            self.name, self.default = name, default

    arg_names = ["x", "n", "BLOCK", "FLAG"]
    params = [_Param("x"), _Param("n"), _Param("BLOCK"), _Param("FLAG", default=True)]

    def __init__(self):
        self.jit_calls = 0
        self.run = _FakeRun()

    def __getitem__(self, grid):
        def call(*args, **meta):
            self.jit_calls += 1
            return type("Compiled", (), {"run": self.run, "function": 7, "packed_metadata": "meta"})()

        return call


@pytest.fixture
def direct(monkeypatch):
    """``launch`` on its direct path, with empty caches, a fake device and a fake stream."""
    pytest.importorskip("triton")
    from triton import knobs

    monkeypatch.setattr(T, "_FAST_LAUNCH", True)
    monkeypatch.setattr(T, "_knobs", knobs)
    monkeypatch.setattr(T, "_compiled", {})
    monkeypatch.setattr(T, "_by_dyn_key", {})
    monkeypatch.setattr(T, "_current_device", lambda: 0)
    monkeypatch.setattr(T, "_cuda_stream", lambda device: 99)
    return knobs


def test_launch_takes_the_direct_path_after_the_first_call(direct):
    """Once a specialisation is compiled, launches go straight to its C launcher with Triton's argument
    layout, unless a launch hook is installed (Triton >= 3.4 always has an empty ``HookChain`` there)."""
    knobs = direct
    kernel = _FakeKernel()
    assert not T._hooked(knobs.runtime.launch_enter_hook)  # no hook installed (in Triton >= 3.4: an empty chain)
    T.launch(kernel, (3, 2), (torch.zeros(4), 5), {"BLOCK": 16})
    T.launch(kernel, (3, 2), (torch.zeros(4), 6), {"BLOCK": 16})
    assert kernel.jit_calls == 1
    (args,) = kernel.run.calls
    # grid, stream, function, cooperative, pdl, two scratch buffers, metadata, launch metadata, two hooks
    assert args[:13] == (3, 2, 1, 99, 7, False, False, None, None, "meta", None, None, None)
    assert args[14:] == (6, 16, True)  # the arguments, then constexprs from meta and the defaults

    hook = lambda *a, **k: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        T.launch(kernel, (3, 2), (torch.zeros(4), 6), {"BLOCK": 16})
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert kernel.jit_calls == 2  # a hook (a profiler) sees every launch through the JIT path


def test_dyn_key_skips_the_argument_key(direct, monkeypatch):
    kernel = _FakeKernel()
    x = torch.zeros(8)
    keys = []
    real_key = T._key
    monkeypatch.setattr(T, "_key", lambda args: keys.append(args) or real_key(args))
    for _ in range(4):
        T.launch(kernel, (1,), (x, 5), {"BLOCK": 16}, None, ("n", 5))
    # first call: JIT; second: full key found, dyn key stored; then the dyn key alone
    assert kernel.jit_calls == 1 and len(kernel.run.calls) == 3 and len(keys) == 2


def test_dyn_key_check_catches_a_missing_value(direct, monkeypatch):
    kernel = _FakeKernel()
    x = torch.zeros(16)
    monkeypatch.setattr(T, "_CHECK_KEYS", True)
    for _ in range(3):  # JIT, full key, then the dyn key with the same arguments: the check passes
        T.launch(kernel, (1,), (x, 5), {"BLOCK": 16}, None, ("n",))
    with pytest.raises(AssertionError, match="dyn_key"):
        T.launch(kernel, (1,), (x[1:], 5), {"BLOCK": 16}, None, ("n",))  # alignment changed, key did not


def test_dyn_keys_are_bounded(direct, monkeypatch):
    kernel = _FakeKernel()
    x = torch.zeros(8)
    monkeypatch.setattr(T, "_MAX_DYN_KEYS", 4)
    for n in range(10):
        T.launch(kernel, (1,), (x, 5), {"BLOCK": 16}, None, (n,))
        T.launch(kernel, (1,), (x, 5), {"BLOCK": 16}, None, (n,))
    assert 0 < len(T._by_dyn_key) <= 4 and kernel.jit_calls == 1


def _tuner(kernel):
    from triformers.triton._common import Tuner

    tuner = Tuner(kernel, [{"BLOCK": 16}])
    tuner.enabled = False
    return tuner


def test_tuner_repeats_a_launch_with_its_grid(direct, monkeypatch):
    """A Tuner launch with a dyn_key seen before goes straight to the C launcher, with the grid and arguments
    of its first direct launch: no grid call, no argument key."""
    kernel = _FakeKernel()
    tuner = _tuner(kernel)
    x = torch.zeros(8)
    grids = []
    grid = lambda c: grids.append(c) or (3, 2)  # noqa: E731
    for n in (5, 6, 7, 8):
        tuner(grid, (x, n), ("k",), {"BLOCK": 16}, {}, ("n",))
    # JIT, then a direct launch that records the entry, then two repeats without grid or key
    assert kernel.jit_calls == 1 and len(grids) == 2 and len(kernel.run.calls) == 3
    assert [c[:4] for c in kernel.run.calls] == [(3, 2, 1, 99)] * 3
    assert [c[14] for c in kernel.run.calls] == [6, 7, 8]  # the arguments of each call
    tuner(grid, (x, 9), ("k",), {"BLOCK": 16}, {}, ("other",))  # another dyn_key: the full path
    assert len(grids) == 3


def test_tuner_repeat_check_catches_a_missing_value(direct, monkeypatch):
    kernel = _FakeKernel()
    tuner = _tuner(kernel)
    x = torch.zeros(16)
    monkeypatch.setattr(T, "_CHECK_KEYS", True)
    for _ in range(3):
        tuner(lambda c: (1,), (x, 5), ("k",), {"BLOCK": 16}, {}, ("n",))
    with pytest.raises(AssertionError, match="dyn_key"):
        tuner(lambda c: (1,), (x[1:], 5), ("k",), {"BLOCK": 16}, {}, ("n",))  # alignment changed, key did not
    with pytest.raises(AssertionError, match="grid"):
        tuner(lambda c: (2,), (x, 5), ("k",), {"BLOCK": 16}, {}, ("n",))  # the grid changed, the keys did not


def test_tuner_repeat_yields_to_a_hook(direct):
    knobs = direct
    kernel = _FakeKernel()
    tuner = _tuner(kernel)
    x = torch.zeros(8)
    for _ in range(3):
        tuner(lambda c: (1,), (x, 5), ("k",), {"BLOCK": 16}, {}, ("n",))
    hook = lambda *a, **k: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        tuner(lambda c: (1,), (x, 5), ("k",), {"BLOCK": 16}, {}, ("n",))
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert kernel.jit_calls == 2


class _CLauncher:
    """Stands for Triton's compiled C launcher (a builtin: no ``__code__``)."""

    __slots__ = ("calls",)

    def __init__(self):
        self.calls = []

    def __call__(self, *args):
        self.calls.append(args)


def test_direct_launch_expands_descriptors_and_passes_addresses(direct, monkeypatch):
    """A kernel with TMA descriptor parameters: Triton wraps its C launcher in a Python loop that expands each
    descriptor on every launch. The direct path calls the C launcher itself, with the arguments Triton's own
    wrapper would build, tensors as their addresses."""
    driver = pytest.importorskip("triton.backends.nvidia.driver")
    from triton.tools.tensor_descriptor import TensorDescriptor

    c_launch = _CLauncher()
    signature = {"x": "*fp32", "d": "tensordesc<fp32[8, 16]>", "e": "tensordesc<fp32[4, 16]>", "n": "i32",
                 "BLOCK": "constexpr", "FLAG": "constexpr"}
    wrapped = driver.wrap_handle_tensordesc(c_launch, signature, None)
    kernel = _FakeKernel()
    kernel.arg_names = list(signature)
    kernel.params = [_FakeKernel._Param(n) for n in signature]
    kernel.params[-1].default = True
    kernel.run.launch = wrapped
    x, y = torch.zeros(64, 16), torch.zeros(32, 16)
    d = TensorDescriptor.from_tensor(x, [8, 16])
    e = TensorDescriptor.from_tensor(y[4:], [4, 16])
    for n in (5, 6):
        T.launch(kernel, (3,), (x, d, e, n), {"BLOCK": 16}, None, ("n", n))
    assert kernel.jit_calls == 1 and len(c_launch.calls) == 1
    base = (3, 1, 1, 99, 7, False, False, None, None, "meta", None, None, None)
    wrapped(*base, x.data_ptr(), d, e, 6, 16, True)  # Triton's own expansion of the same call
    direct_call, reference = c_launch.calls
    assert direct_call == reference
    assert direct_call[13] == x.data_ptr() and direct_call[14] is x  # the address, then d expanded
    monkeypatch.setattr(T, "_CHECK_KEYS", True)  # checked launches refuse what Triton's launcher refused
    with pytest.raises(AssertionError, match=r"\[0\] are not on the launch's device cuda:0: \['cpu'\]"):
        T.launch(kernel, (3,), (x, d, e, 7), {"BLOCK": 16}, None, ("n", 7))


def test_direct_launch_keeps_an_unknown_wrapper(direct):
    """A Python launcher this code does not know stays in use, with the tensors as they are."""
    kernel = _FakeKernel()
    x = torch.zeros(8)
    for n in (5, 6):
        T.launch(kernel, (1,), (x, n), {"BLOCK": 16})
    assert kernel.run.calls[-1][13] is x


def test_hooked():
    assert not T._hooked(None) and T._hooked(print)
    chain = type("HookChain", (), {"calls": []})()
    assert not T._hooked(chain)
    chain.calls.append(print)
    assert T._hooked(chain)


@pytest.mark.gpu
def test_repeated_launches_skip_the_jit_on_the_gpu(monkeypatch):
    """On CUDA, a second call with the same specialisation never enters Triton's JIT, and computes the same."""
    from triton.runtime.jit import JITFunction

    from triformers.ops.rmsnorm import rms_norm, rms_norm_reference

    jit_run = JITFunction.run
    calls = []
    monkeypatch.setattr(JITFunction, "run", lambda self, *a, **k: calls.append(self) or jit_run(self, *a, **k))
    x = torch.randn(64, 1000, device="cuda", dtype=torch.float16)
    w = torch.rand(1000, device="cuda", dtype=torch.float16)
    first = rms_norm(x, w)
    n_first = len(calls)
    second = rms_norm(x + 1, w)
    assert len(calls) == n_first, "the second launch went through the JIT"
    torch.testing.assert_close(first, rms_norm_reference(x, w, 1e-6).half(), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(second, rms_norm_reference(x + 1, w, 1e-6).half(), atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
def test_resident_programs_of_a_compiled_kernel():
    """The split-K launch sizes its split with this: the occupancy of the kernel as compiled (its registers
    and shared memory), on the GPU at hand."""
    import ctypes
    import unittest.mock

    from triton.runtime.jit import JITFunction

    from triformers.ops.rmsnorm import rms_norm

    x = torch.randn(64, 1000, device="cuda", dtype=torch.float16)
    seen = []
    run = JITFunction.run

    def spy(self, *args, grid, warmup, **kwargs):
        compiled = run(self, *args, grid=grid, warmup=warmup, **kwargs)
        seen.append((self, args, grid, kwargs, compiled))
        return compiled

    with unittest.mock.patch.object(JITFunction, "run", spy), unittest.mock.patch.object(T, "_FAST_LAUNCH", False):
        rms_norm(x, torch.rand(1000, device="cuda", dtype=torch.float16))
    kernel, args, grid, meta, compiled = seen[-1]
    got = T.resident_programs(kernel, grid, args, meta, x.device)
    # the driver's own occupancy calculation for the loaded kernel, an independent reference
    blocks = ctypes.c_int()
    rc = ctypes.CDLL("libcuda.so.1").cuOccupancyMaxActiveBlocksPerMultiprocessor(
        ctypes.byref(blocks), ctypes.c_void_p(compiled.function), 32 * compiled.metadata.num_warps,
        ctypes.c_size_t(compiled.metadata.shared))
    assert rc == 0 and got == blocks.value >= 1
