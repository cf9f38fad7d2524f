// CUDA kernels of torch_crit::gram_hadamard_accumulate_. CUDA headers only (no torch): CI
// compiles this file with plain nvcc (scripts/compile_cuda.sh); the dispatcher glue is in
// gram_hadamard_cuda.cpp.
//
// One thread block owns a BM x BN tile of the Gram matrix G[(i, a), (j, b)] (rows r = i*K1 + a,
// columns s = j*K2 + b) and loops over the terms of the launch. For each term the inner
// dimension M is staged through shared memory in chunks of BK (A and B tiles stored k-major,
// converted to the accumulation type on load), each thread keeps a TM x TN register tile of the
// term's partial Gram, and the epilogue multiplies it by C_t[i, j (, a, b)] into a second register
// tile that sums the terms. Only then is out read and written, once per element and launch
// (every element of out belongs to exactly one thread: no atomics). symmetric: blocks whose every
// entry has i > j exit at once, entries with i > j are skipped, and entries with i < j are also
// written to out[j, i, b, a].
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "gram_hadamard_kernel.h"

namespace torch_crit {
namespace cuda {
namespace {

constexpr int kThreadsX = 16;  // threads along the columns (j, b) of a tile
constexpr int kThreadsY = 16;  // threads along the rows (i, a)
constexpr int kThreads = kThreadsX * kThreadsY;
constexpr int kMaxGridY = 65535;

struct TermPack {
  GramHadamardTermArgs term[kGramHadamardMaxTermsPerLaunch];
  int n;
};

// TM: rows and columns per thread (tile BM = BN = 16 * TM); BK: inner-dimension chunk.
template <typename scalar_t, typename acc_t, int TM, int BK>
__global__ void __launch_bounds__(kThreads)
    gram_hadamard_kernel(const __grid_constant__ TermPack pack, scalar_t* __restrict__ out,
                         int64_t N1, int64_t N2, int64_t K1, int64_t K2, bool symmetric,
                         int64_t row_tile_offset) {
  constexpr int BM = kThreadsY * TM;
  constexpr int BN = kThreadsX * TM;
  constexpr int kLoadRowsPerPass = kThreads / BK;  // rows of a tile loaded per pass
  constexpr int kLoadPasses = BM / kLoadRowsPerPass;
  static_assert(kThreads % BK == 0 && BM % kLoadRowsPerPass == 0, "tile shape");

  const int64_t R = N1 * K1, S = N2 * K2;
  const int64_t r0 = (row_tile_offset + static_cast<int64_t>(blockIdx.y)) * BM;
  const int64_t s0 = static_cast<int64_t>(blockIdx.x) * BN;
  if (r0 >= R || s0 >= S) return;
  if (symmetric) {
    const int64_t i_min = r0 / K1;
    const int64_t j_max = (min(s0 + BN, S) - 1) / K2;
    if (i_min > j_max) return;  // every entry has i > j: it is written as a mirror elsewhere
  }

  __shared__ acc_t As[BK][BM + 1];
  __shared__ acc_t Bs[BK][BN + 1];

  const int tid = threadIdx.x;
  const int tx = tid % kThreadsX, ty = tid / kThreadsX;
  const int load_k = tid % BK;          // inner index this thread loads
  const int load_row = tid / BK;        // first tile row this thread loads

  acc_t total[TM][TM];
#pragma unroll
  for (int p = 0; p < TM; ++p)
#pragma unroll
    for (int q = 0; q < TM; ++q) total[p][q] = acc_t(0);

  for (int t = 0; t < pack.n; ++t) {
    const GramHadamardTermArgs& T = pack.term[t];
    const scalar_t* __restrict__ A = static_cast<const scalar_t*>(T.A);
    const scalar_t* __restrict__ B = static_cast<const scalar_t*>(T.B);
    const scalar_t* __restrict__ C = static_cast<const scalar_t*>(T.C);
    const int64_t M = T.M;

    // Offsets of the rows this thread loads (-1: outside the matrix).
    int64_t a_off[kLoadPasses], b_off[kLoadPasses];
#pragma unroll
    for (int l = 0; l < kLoadPasses; ++l) {
      const int64_t r = r0 + load_row + l * kLoadRowsPerPass;
      const int64_t s = s0 + load_row + l * kLoadRowsPerPass;
      a_off[l] = r < R ? (r / K1) * T.a_stride[0] + (r % K1) * T.a_stride[1] : -1;
      b_off[l] = s < S ? (s / K2) * T.b_stride[0] + (s % K2) * T.b_stride[1] : -1;
    }

    acc_t part[TM][TM];
#pragma unroll
    for (int p = 0; p < TM; ++p)
#pragma unroll
      for (int q = 0; q < TM; ++q) part[p][q] = acc_t(0);

    for (int64_t m0 = 0; m0 < M; m0 += BK) {
      const int64_t m = m0 + load_k;
      const bool m_ok = m < M;
#pragma unroll
      for (int l = 0; l < kLoadPasses; ++l) {
        const int row = load_row + l * kLoadRowsPerPass;
        As[load_k][row] = (m_ok && a_off[l] >= 0)
                              ? static_cast<acc_t>(A[a_off[l] + m * T.a_stride[2]])
                              : acc_t(0);
        Bs[load_k][row] = (m_ok && b_off[l] >= 0)
                              ? static_cast<acc_t>(B[b_off[l] + m * T.b_stride[2]])
                              : acc_t(0);
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < BK; ++k) {
        acc_t av[TM], bv[TM];
#pragma unroll
        for (int p = 0; p < TM; ++p) av[p] = As[k][ty + kThreadsY * p];
#pragma unroll
        for (int q = 0; q < TM; ++q) bv[q] = Bs[k][tx + kThreadsX * q];
#pragma unroll
        for (int p = 0; p < TM; ++p)
#pragma unroll
          for (int q = 0; q < TM; ++q) part[p][q] += av[p] * bv[q];
      }
      __syncthreads();
    }

    // Hadamard epilogue: total += part * C_t.
#pragma unroll
    for (int p = 0; p < TM; ++p) {
      const int64_t r = r0 + ty + kThreadsY * p;
      if (r >= R) continue;
      const int64_t i = r / K1, a = r - i * K1;
#pragma unroll
      for (int q = 0; q < TM; ++q) {
        const int64_t s = s0 + tx + kThreadsX * q;
        if (s >= S) continue;
        if (T.c_mode == 0) {
          total[p][q] += part[p][q];
        } else {
          const int64_t j = s / K2, b = s - j * K2;
          int64_t c_off = i * T.c_stride[0] + j * T.c_stride[1];
          if (T.c_mode == 2) c_off += a * T.c_stride[2] + b * T.c_stride[3];
          total[p][q] += part[p][q] * static_cast<acc_t>(C[c_off]);
        }
      }
    }
  }

  // out += total (one rounding), with the symmetric mirror.
#pragma unroll
  for (int p = 0; p < TM; ++p) {
    const int64_t r = r0 + ty + kThreadsY * p;
    if (r >= R) continue;
    const int64_t i = r / K1, a = r - i * K1;
#pragma unroll
    for (int q = 0; q < TM; ++q) {
      const int64_t s = s0 + tx + kThreadsX * q;
      if (s >= S) continue;
      const int64_t j = s / K2, b = s - j * K2;
      if (symmetric && i > j) continue;
      scalar_t* o = out + ((i * N2 + j) * K1 + a) * K2 + b;
      *o = static_cast<scalar_t>(static_cast<acc_t>(*o) + total[p][q]);
      if (symmetric && i < j) {
        scalar_t* om = out + ((j * N2 + i) * K1 + b) * K2 + a;  // out[j, i, b, a]
        *om = static_cast<scalar_t>(static_cast<acc_t>(*om) + total[p][q]);
      }
    }
  }
}

template <typename scalar_t, typename acc_t, int TM, int BK>
cudaError_t launch_typed(bool symmetric, void* out, int64_t N1, int64_t N2, int64_t K1,
                         int64_t K2, const GramHadamardTermArgs* terms, int n_terms,
                         cudaStream_t stream) {
  constexpr int BM = kThreadsY * TM;
  const int64_t R = N1 * K1, S = N2 * K2;
  if (R == 0 || S == 0 || n_terms == 0) return cudaSuccess;
  const int64_t row_tiles = (R + BM - 1) / BM;
  const int64_t col_tiles = (S + BM - 1) / BM;
  if (col_tiles > 0x7fffffffLL) return cudaErrorInvalidValue;
  TermPack pack;
  for (int t0 = 0; t0 < n_terms; t0 += kGramHadamardMaxTermsPerLaunch) {
    pack.n = std::min(kGramHadamardMaxTermsPerLaunch, n_terms - t0);
    for (int t = 0; t < pack.n; ++t) pack.term[t] = terms[t0 + t];
    for (int64_t y0 = 0; y0 < row_tiles; y0 += kMaxGridY) {
      const dim3 grid(static_cast<unsigned>(col_tiles),
                      static_cast<unsigned>(std::min<int64_t>(kMaxGridY, row_tiles - y0)));
      gram_hadamard_kernel<scalar_t, acc_t, TM, BK><<<grid, kThreads, 0, stream>>>(
          pack, static_cast<scalar_t*>(out), N1, N2, K1, K2, symmetric, y0);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t launch_gram_hadamard_accumulate(GramHadamardDtype dtype, bool accumulate_fp64,
                                            bool symmetric, void* out, int64_t N1, int64_t N2,
                                            int64_t K1, int64_t K2,
                                            const GramHadamardTermArgs* terms, int n_terms,
                                            cudaStream_t stream) {
  if (dtype == GramHadamardDtype::kFloat64) {
    return launch_typed<double, double, 4, 16>(symmetric, out, N1, N2, K1, K2, terms, n_terms,
                                               stream);
  }
  if (accumulate_fp64) {
    return launch_typed<float, double, 4, 16>(symmetric, out, N1, N2, K1, K2, terms, n_terms,
                                              stream);
  }
  return launch_typed<float, float, 8, 8>(symmetric, out, N1, N2, K1, K2, terms, n_terms,
                                          stream);
}

}  // namespace cuda
}  // namespace torch_crit
