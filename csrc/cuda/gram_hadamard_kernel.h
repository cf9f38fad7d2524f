#pragma once
// Plain C++ interface of the CUDA kernels of torch_crit::gram_hadamard_accumulate_ (no torch
// headers: compiled by nvcc alone in CI, called from csrc/cuda/gram_hadamard_cuda.cpp).
//
//   out[i, j, a, b] += sum_t sum_m A_t[i, a, m] * B_t[j, b, m] * C_t[i, j (, a, b)]
//
// All strides are in elements. A_t element (i, a, m) is at A + i*a_stride[0] + a*a_stride[1]
// + m*a_stride[2]; likewise B_t, and C_t (c_mode 1: C + i*c_stride[0] + j*c_stride[1];
// c_mode 2: + a*c_stride[2] + b*c_stride[3]). out is contiguous [N1, N2, K1, K2].
#include <cuda_runtime_api.h>

#include <cstdint>

namespace torch_crit {
namespace cuda {

// Terms fused into one launch (out is read and written once per group of this many terms).
constexpr int kGramHadamardMaxTermsPerLaunch = 16;

struct GramHadamardTermArgs {
  const void* A;
  const void* B;
  const void* C;  // nullptr when c_mode == 0
  int64_t a_stride[3];
  int64_t b_stride[3];
  int64_t c_stride[4];
  int64_t M;
  int c_mode;  // 0: no factor, 1: C [N1, N2], 2: C [N1, N2, K1, K2]
};

enum class GramHadamardDtype : int { kFloat32 = 0, kFloat64 = 1 };

// Enqueues the accumulation on `stream` (any number of terms; groups of
// kGramHadamardMaxTermsPerLaunch per launch). accumulate_fp64 computes float32 inputs in float64
// (shared-memory tiles, products and sums) and rounds once into out. symmetric (N1 == N2,
// K1 == K2) computes the pairs i <= j only and writes out[j, i, b, a] for i < j as well.
// Returns the first launch error (cudaSuccess when all launches were enqueued).
cudaError_t launch_gram_hadamard_accumulate(GramHadamardDtype dtype, bool accumulate_fp64,
                                            bool symmetric, void* out, int64_t N1, int64_t N2,
                                            int64_t K1, int64_t K2,
                                            const GramHadamardTermArgs* terms, int n_terms,
                                            cudaStream_t stream);

}  // namespace cuda
}  // namespace torch_crit
