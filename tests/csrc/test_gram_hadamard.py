"""torch_crit::gram_hadamard_accumulate_: compiled kernels vs a brute-force float64 truth.

The truth is formed pair by pair from explicit products (no GEMM, no einsum), so it checks the
kernels and the pure-PyTorch reference independently. Tolerances:

* float64: 1e-12 relative to max |truth| (round-off of an M-term dot product is ~M·2⁻⁵³),
* float32 with ``accumulate_fp64``: every element within one float32 rounding of the float64 truth
  (|err| ≤ 2⁻²⁴·|truth| + 1e-12·scale) — a float32 accumulation fails this,
* float32 without it: 1e-5 relative to the scale Σ_t max|A_t B_tᵀ C_t| (M ≤ 700 terms, random signs).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import pytest
import torch

from torch_crit import _ops

OP = torch.ops.torch_crit.gram_hadamard_accumulate_.default

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])]


@dataclasses.dataclass
class Sample:
    name: str
    out: torch.Tensor
    A: list[torch.Tensor]
    B: list[torch.Tensor]
    C: list[Optional[torch.Tensor]]
    symmetric: bool = False

    def clone_out(self) -> torch.Tensor:
        return self.out.clone()


def sample_inputs(device: str, dtype: torch.dtype) -> list[Sample]:
    """Inputs covering every C mode, None, N=1, K=1, several terms, strided/expanded views,
    M=0, more than 16 terms (CUDA launch groups), several tiles (CPU parallel path) and
    symmetric calls. ``out`` starts non-zero so that accumulation (not assignment) is checked."""
    g = torch.Generator().manual_seed(1234)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    s: list[Sample] = []
    s.append(Sample("N1_K1_M1_none", r(1, 1, 1, 1), [r(1, 1, 1)], [r(1, 1, 1)], [None]))
    N1, N2, K1, K2, M = 5, 7, 3, 2, 11
    s.append(
        Sample(
            "three_terms_every_C_mode",
            r(N1, N2, K1, K2),
            [r(N1, K1, M), r(N1, K1, 4), r(N1, K1, 9)],
            [r(N2, K2, M), r(N2, K2, 4), r(N2, K2, 9)],
            [None, r(N1, N2), r(N1, N2, K1, K2)],
        )
    )
    # strided operands: a slice along M, a permuted layout, a transposed C and an expanded C
    a_perm = r(M, N1, K1).permute(1, 2, 0)
    s.append(
        Sample(
            "non_contiguous",
            r(N1, N2, K1, K2),
            [r(N1, K1, 2 * M)[:, :, ::2], a_perm, r(N1, K1, 3)],
            [r(N2, K2, M + 3)[:, :, 3:], r(N2, K2, M), r(N2, K2, 3)],
            [r(N2, N1).t(), r(N1, N2, K2, K1).transpose(2, 3), r(1, 1).expand(N1, N2)],
        )
    )
    s.append(Sample("M_zero_term", r(3, 4, 2, 2), [r(3, 2, 0), r(3, 2, 5)], [r(4, 2, 0), r(4, 2, 5)], [r(3, 4), None]))
    s.append(Sample("trace_K1", r(40, 30, 1, 1), [r(40, 1, 50)], [r(30, 1, 50)], [r(40, 30)]))
    s.append(
        Sample(
            "seventeen_terms",
            r(6, 5, 2, 3),
            [r(6, 2, t + 1) for t in range(17)],
            [r(5, 3, t + 1) for t in range(17)],
            [r(6, 5) if t % 2 else None for t in range(17)],
        )
    )
    # several tiles in both directions (rows N*K > 320 on CPU, > 128 on CUDA)
    s.append(
        Sample(
            "many_tiles",
            r(40, 35, 10, 10),
            [r(40, 10, 33), r(40, 10, 7)],
            [r(35, 10, 33), r(35, 10, 7)],
            [r(40, 35), r(40, 35, 10, 10)],
        )
    )
    s.append(Sample("tall_K1", r(700, 9, 1, 1), [r(700, 1, 20)], [r(9, 1, 20)], [None]))
    x, y = r(50, 4, 30), r(50, 4, 6)
    c = r(50, 50)
    c4 = r(50, 50, 4, 4)
    s.append(
        Sample(
            "symmetric_ntk_like",
            r(50, 50, 4, 4),
            [x, y],
            [x, y],
            [c + c.t(), c4 + c4.permute(1, 0, 3, 2)],
            symmetric=True,
        )
    )
    z = r(400, 1, 40)
    s.append(Sample("symmetric_trace", r(400, 400, 1, 1), [z], [z], [None], symmetric=True))
    # symmetric=True on inputs that are NOT symmetric: defined as upper half + mirror
    s.append(Sample("symmetric_nonsym_inputs", r(9, 9, 3, 3), [r(9, 3, 5)], [r(9, 3, 5)], [r(9, 9)], symmetric=True))
    return s


def truth(sample: Sample) -> torch.Tensor:
    """Brute-force float64 result: explicit products summed over m, one sample i at a time."""
    out = sample.out.detach().double().cpu().clone()
    N1, N2, K1, K2 = out.shape
    for a, b, c in zip(sample.A, sample.B, sample.C):
        a, b = a.double().cpu(), b.double().cpu()
        cc = None if c is None else c.double().cpu()
        g = torch.empty(N1, N2, K1, K2, dtype=torch.float64)
        step = max(1, 2_000_000 // max(1, N2 * K1 * K2 * a.shape[2]))
        for i in range(0, N1, step):  # explicit products, a few samples i at a time
            g[i : i + step] = (a[i : i + step, None, :, None, :] * b[None, :, None, :, :]).sum(-1)
        if cc is not None:
            g = g * (cc[:, :, None, None] if cc.dim() == 2 else cc)
        if sample.symmetric:
            upper = torch.ones(N1, N2, dtype=torch.float64).triu()[:, :, None, None]
            strict = torch.ones(N1, N2, dtype=torch.float64).triu(1)[:, :, None, None]
            g = g * upper + (g * strict).permute(1, 0, 3, 2)
        out += g
    return out


def scale(sample: Sample) -> float:
    return max(float(truth(sample).abs().max()), 1e-30)


def run(sample: Sample, *, fp64: bool = False, reference: bool = False) -> torch.Tensor:
    out = sample.clone_out()
    fn = _ops.gram_hadamard_accumulate_reference_ if reference else _ops.gram_hadamard_accumulate_
    fn(out, sample.A, sample.B, sample.C, fp64, symmetric=sample.symmetric)
    return out


SAMPLE_NAMES = [smp.name for smp in sample_inputs("cpu", torch.float64)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_float64_matches_brute_force(device: str, name: str) -> None:
    sample = next(smp for smp in sample_inputs(device, torch.float64) if smp.name == name)
    inputs_before = [t.clone() for t in sample.A + sample.B + [c for c in sample.C if c is not None]]
    _ops.reset_backend_counts()
    got = run(sample)
    assert _ops.last_backend() == device
    assert _ops.backend_counts() == {device: 1}
    want = truth(sample)
    err = float((got.cpu() - want).abs().max()) / float(want.abs().max())
    assert err < 1e-12, f"{name}: relative error {err:.3e}"
    ref = run(sample, reference=True)
    assert float((ref.cpu() - want).abs().max()) / float(want.abs().max()) < 1e-12
    after = sample.A + sample.B + [c for c in sample.C if c is not None]
    assert all(torch.equal(x, y) for x, y in zip(inputs_before, after)), "inputs were modified"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["three_terms_every_C_mode", "non_contiguous", "many_tiles", "symmetric_trace", "seventeen_terms"])
def test_float32_accumulation(device: str, name: str) -> None:
    sample = next(smp for smp in sample_inputs(device, torch.float32) if smp.name == name)
    want = truth(sample)
    sc = sum(
        float(
            truth(dataclasses.replace(sample, out=torch.zeros_like(sample.out), A=[a], B=[b], C=[c]))
            .abs()
            .max()
        )
        for a, b, c in zip(sample.A, sample.B, sample.C)
    )
    got64 = run(sample, fp64=True).cpu().double()
    bound = 2.0**-24 * want.abs() + 1e-12 * sc
    excess = float((got64 - want).abs().sub(bound).max())
    assert excess <= 0, f"{name}: fp64 accumulation is off by more than one float32 rounding ({excess:.3e})"
    ref64 = run(sample, fp64=True, reference=True).cpu().double()
    assert float((ref64 - want).abs().sub(bound).max()) <= 0
    got32 = run(sample).cpu().double()
    err32 = float((got32 - want).abs().max()) / sc
    assert err32 < 1e-5, f"{name}: float32 error {err32:.3e} relative to the scale {sc:.3e}"


@pytest.mark.parametrize("device", DEVICES)
def test_symmetric_equals_full_for_symmetric_inputs(device: str) -> None:
    sample = next(smp for smp in sample_inputs(device, torch.float64) if smp.name == "symmetric_ntk_like")
    full = run(dataclasses.replace(sample, symmetric=False))
    sym = run(sample)
    err = float((full - sym).abs().max() / full.abs().max())
    assert err < 1e-12


def test_thread_counts_agree() -> None:
    """The serial (BLAS-threaded) and the tile-parallel CPU paths give the same numbers.

    The sample must exceed the kernel's parallel threshold (``kMinParallelWork`` = 3.2e7
    multiply-adds in ``csrc/cpu/gram_hadamard.cpp``) and have at least 2 x threads tile pairs
    (tiles of >= 64 rows), or both runs take the serial path and compare it with itself.
    """
    g = torch.Generator().manual_seed(7)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    n, k, m = 256, 2, 128
    sample = Sample("above_parallel_threshold", r(n, n, k, k), [r(n, k, m), r(n, k, m)],
                    [r(n, k, m), r(n, k, m)], [r(n, n), r(n, n, k, k)])
    work = sum(n * n * k * k * a.shape[-1] for a in sample.A)
    assert work > 3.2e7 and (n * k // 64) ** 2 >= 4
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(sample)
        torch.set_num_threads(2)
        two = run(sample)
    finally:
        torch.set_num_threads(before)
    assert float((one - two).abs().max() / one.abs().max()) < 1e-13
    ref = run(sample, reference=True)  # and both are right
    assert float((two - ref).abs().max() / ref.abs().max()) < 1e-12


# opcheck's test_aot_dispatch_dynamic costs ~10 s per sample on the CI machine; AOTAutograd with
# dynamic shapes is covered once by test_torch_compile_fullgraph (aot_eager, dynamic=True).
OPCHECK_CASES = [
    ("three_terms_every_C_mode", ("test_schema", "test_faketensor")),
    ("N1_K1_M1_none", ("test_schema", "test_faketensor")),
    ("non_contiguous", ("test_schema", "test_faketensor")),
    ("symmetric_nonsym_inputs", ("test_schema", "test_faketensor")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,utils", OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck(device: str, name: str, utils: tuple[str, ...]) -> None:
    sample = next(smp for smp in sample_inputs(device, torch.float64) if smp.name == name)
    torch.library.opcheck(
        OP,
        (sample.clone_out(), sample.A, sample.B, sample.C),
        {"accumulate_fp64": False, "symmetric": sample.symmetric},
        test_utils=utils,
    )


def test_torch_compile_fullgraph() -> None:
    sample = next(smp for smp in sample_inputs("cpu", torch.float64) if smp.name == "three_terms_every_C_mode")

    def f(out: torch.Tensor, a0: torch.Tensor, a1: torch.Tensor, b0: torch.Tensor, b1: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
        _ops.gram_hadamard_accumulate_(out, [a0, a1], [b0, b1], [None, c1])
        return out * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    args = (sample.A[0], sample.A[1], sample.B[0], sample.B[1], sample.C[1])
    got = compiled(sample.clone_out(), *args)
    want = f(sample.clone_out(), *args)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-12


def test_meta_tensors_use_the_fake_kernel() -> None:
    out = torch.empty(3, 4, 2, 2, device="meta")
    _ops.gram_hadamard_accumulate_(out, [torch.empty(3, 2, 5, device="meta")], [torch.empty(4, 2, 5, device="meta")], [None])
    assert _ops.last_backend() == "meta"
    with pytest.raises(ValueError, match=r"B\[0\] must have shape \[4, 2, M\]"):
        _ops.gram_hadamard_accumulate_(out, [torch.empty(3, 2, 5, device="meta")], [torch.empty(5, 2, 5, device="meta")], [None])


def test_gradients_flow_through_the_reference() -> None:
    g = torch.Generator().manual_seed(7)
    a = torch.randn(3, 2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, 2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    c = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)

    def f(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(3, 4, 2, 2, dtype=torch.float64)
        _ops.gram_hadamard_accumulate_(out, [a], [b], [c])
        return out

    assert torch.autograd.gradcheck(f, (a, b, c))
    assert _ops.last_backend() == "reference"
    with torch.no_grad():
        f(a, b, c)
    assert _ops.last_backend() == "cpu"


def test_missing_extension_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_ops, "HAS_EXT", False)
    monkeypatch.setattr(_ops, "_warned", False)
    sample = sample_inputs("cpu", torch.float64)[1]
    with pytest.warns(RuntimeWarning, match="pip install --no-build-isolation -e ."):
        out = run(sample)
    assert _ops.last_backend() == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(sample)  # warns once only
    assert float((out - truth(sample)).abs().max() / truth(sample).abs().max()) < 1e-12


def test_cuda_tensors_on_a_cpu_only_build_name_the_switch() -> None:
    if _ops.has_device_kernel("cuda"):
        pytest.skip("this build has CUDA kernels")
    with pytest.raises(RuntimeError, match="TORCH_CRIT_CUDA=1"):
        _ops._require_device_kernel(torch.device("cuda", 0))
    with pytest.raises(RuntimeError, match="no torch_crit kernel for device type 'xpu'"):
        _ops._require_device_kernel(torch.device("xpu"))
    assert _ops.has_device_kernel("cpu")


def _bad_calls(device: str) -> list[tuple[str, type, str, tuple, dict]]:
    d64 = dict(dtype=torch.float64, device=device)
    out = torch.zeros(3, 4, 2, 2, **d64)
    a, b = torch.zeros(3, 2, 5, **d64), torch.zeros(4, 2, 5, **d64)
    return [
        ("out_3d", ValueError, "out must have 4 dims", (torch.zeros(3, 4, 2, **d64), [a], [b], [None]), {}),
        ("out_int", TypeError, "supported are float32 and float64", (out.long(), [a.long()], [b.long()], [None]), {}),
        ("out_noncontig", ValueError, "out must be contiguous", (torch.zeros(4, 3, 2, 2, **d64).transpose(0, 1), [a], [b], [None]), {}),
        ("term_count", ValueError, "one entry per term", (out, [a, a], [b], [None]), {}),
        ("A_2d", ValueError, r"A\[0\] must have 3 dims", (out, [a[:, 0]], [b], [None]), {}),
        ("A_rows", ValueError, r"A\[0\]\.size\(0\) must be 3", (out, [torch.zeros(2, 2, 5, **d64)], [b], [None]), {}),
        ("B_M", ValueError, r"B\[0\]\.size\(2\) must be 5", (out, [a], [torch.zeros(4, 2, 6, **d64)], [None]), {}),
        ("A_dtype", TypeError, r"A\[0\] has dtype Float but out has Double", (out, [a.float()], [b], [None]), {}),
        ("C_shape", ValueError, r"C\[0\] must be None, \[N1, N2\]", (out, [a], [b], [torch.zeros(3, 4, 2, **d64)]), {}),
        ("C_4d_shape", ValueError, r"C\[0\] of 4 dims must match out", (out, [a], [b], [torch.zeros(3, 4, 2, 1, **d64)]), {}),
        ("C_dtype", TypeError, r"C\[0\] has dtype Float", (out, [a], [b], [torch.zeros(3, 4, device=device)]), {}),
        ("symmetric_shape", ValueError, "symmetric=True needs out of shape", (out, [a], [b], [None]), {"symmetric": True}),
        ("overlap", RuntimeError, "unsupported operation", (out, [out.view(-1)[:24].view(3, 2, 4)], [torch.zeros(4, 2, 4, **d64)], [None]), {}),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(13))
def test_bad_arguments_raise_with_a_message(device: str, case: int) -> None:
    name, exc, pattern, args, kwargs = _bad_calls(device)[case]
    with pytest.raises(exc, match=pattern):
        OP(*args, **kwargs)


def test_mixed_devices_raise() -> None:
    out = torch.zeros(3, 4, 2, 2, dtype=torch.float64)
    a = torch.zeros(3, 2, 5, dtype=torch.float64)
    b = torch.zeros(4, 2, 5, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match=r"B\[0\] is on meta but out is on cpu"):
        _ops.gram_hadamard_accumulate_(out, [a], [b], [None])
