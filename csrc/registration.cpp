// The one TORCH_LIBRARY of torch_crit: every operator schema is declared here, the CPU
// implementations live in csrc/cpu/, the CUDA ones in csrc/cuda/ (TORCH_LIBRARY_IMPL blocks).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A bare module so that `from torch_crit import _C` loads the library (and runs the
// registrations below) within the CPython limited API; no pybind11.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "torch_crit operator library (torch.ops.torch_crit)", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(torch_crit, m) {
  // out[i, j, a, b] += sum_t sum_m A_t[i, a, m] * B_t[j, b, m] * C_t[i, j (, a, b)]
  //   out: [N1, N2, K1, K2]; A_t: [N1, K1, M_t]; B_t: [N2, K2, M_t];
  //   C_t: None (all ones), [N1, N2] or [N1, N2, K1, K2].
  //   accumulate_fp64: float64 inner products and accumulation for float32 inputs.
  //   symmetric: compute the pairs i <= j only; out[j, i, b, a] (i < j) gets the value of
  //     out[i, j, a, b] (exact when the summed contribution is symmetric, e.g. NTK(x, x)).
  // The fused primitive behind the structured NTK and dNTK (docs/architecture.md). Argument
  // rules: csrc/gram_hadamard.h; CPU kernel: csrc/cpu/; CUDA kernel: csrc/cuda/.
  m.def(
      "gram_hadamard_accumulate_(Tensor(a!) out, Tensor[] A, Tensor[] B, Tensor?[] C, "
      "bool accumulate_fp64=False, bool symmetric=False) -> ()");
}
