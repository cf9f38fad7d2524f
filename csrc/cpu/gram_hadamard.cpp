// CPU implementation of torch_crit::gram_hadamard_accumulate_ (schema in csrc/registration.cpp,
// argument rules in csrc/gram_hadamard.h).
//
// Work decomposition. Rows r = (i, a) of A_t and columns s = (j, b) of B_t are cut into tiles of
// about kTileRows rows (whole samples per tile; smaller when that gives too few tiles per thread). For one (row tile, column tile) pair every term t
// is handled in turn:
//   1. G = A_t[tile rows] @ B_t[tile cols]^T  -> [Ti*K1, Tj*K2], one BLAS GEMM into a per-thread
//      buffer (float64 GEMMs over float64 copies of the operands, in chunks of kChunkM columns,
//      when accumulate_fp64 is set for float32 inputs);
//   2. acc[(i, a), (j, b)] += G[(i, a), (j, b)] * C_t[i, j (, a, b)]  (the Hadamard epilogue, into
//      a per-thread tile accumulator with the GEMM's layout; a term without C is accumulated by
//      BLAS itself, addmm with beta = 1, and needs no G);
// and only then is the accumulator added (transposed to [i, j, a, b]) to out, so out is read and
// written once per call and no [N1, N2, K1, K2] temporary exists. Memory beyond out: per thread one G tile and one accumulator
// tile (about kTileRows^2 elements each) plus, in fp64 mode, two kTileRows x kChunkM buffers.
//
// Threads. With at least two tiles per thread the tiles are shared out dynamically (an atomic
// counter: robust to a busy core) inside one at::parallel_for region; BLAS then runs
// single-threaded in each worker (nested OpenMP), so threads are never oversubscribed. With fewer
// tiles the tiles run one after the other on the calling thread and BLAS uses the intra-op threads.
//
// symmetric=True: only tile pairs with column tile >= row tile are computed (same tiling on both
// sides); entries with i < j are also written to out[j, i, b, a], entries with i > j inside a
// diagonal tile are dropped. This halves the GEMM work for NTK(x, x).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "gram_hadamard.h"

namespace torch_crit {
namespace {

constexpr int64_t kTileRows = 320;   // target rows (i, a) / columns (j, b) per tile
constexpr int64_t kMinTileRows = 64;  // smallest tile the tiling shrinks to for parallelism
constexpr int64_t kTilesPerThread = 4;
constexpr int64_t kChunkM = 1024;    // inner-dimension chunk of the float64 conversion buffers
constexpr double kMinParallelWork = 3.2e7;  // multiply-adds (~10 ms single-threaded) before tiles go parallel

// One term with its operands as row matrices: A rows [N1*K1, M], B rows [N2*K2, M].
struct CpuTerm {
  at::Tensor a_rows, b_rows;
  const void* c = nullptr;
  CMode c_mode = CMode::kNone;
  int64_t cs[4] = {0, 0, 0, 0};  // strides of C in elements
  int64_t M = 0;
};

// [N, K, M] -> [N*K, M] with a unit stride in one of the two dims (a view when possible), so that
// every tile slice goes to BLAS without a copy.
at::Tensor as_rows(const at::Tensor& x) {
  at::Tensor r = x.reshape({x.size(0) * x.size(1), x.size(2)});
  if (r.size(0) > 1 && r.size(1) > 1 && r.stride(1) != 1 && r.stride(0) != 1) r = r.contiguous();
  return r;
}

struct Tiling {
  int64_t N1, N2, K1, K2;
  int64_t Ti, Tj;      // samples per row tile / column tile
  int64_t nI, nJ;      // number of row / column tiles
  bool symmetric;
  std::vector<std::pair<int64_t, int64_t>> pairs;  // (row tile, column tile) to compute
};

// Tiles of about `rows` rows and columns; halved (down to kMinTileRows) until every thread gets
// about kTilesPerThread tile pairs, so that mid-sized problems still run tile-parallel.
Tiling make_tiling(int64_t N1, int64_t N2, int64_t K1, int64_t K2, bool symmetric,
                   int64_t n_threads) {
  Tiling t{N1, N2, K1, K2, 0, 0, 0, 0, symmetric, {}};
  for (int64_t rows = kTileRows;; rows /= 2) {
    t.Ti = std::min<int64_t>(N1, std::max<int64_t>(1, (rows + K1 - 1) / K1));
    t.Tj = symmetric ? t.Ti : std::min<int64_t>(N2, std::max<int64_t>(1, (rows + K2 - 1) / K2));
    t.nI = (N1 + t.Ti - 1) / t.Ti;
    t.nJ = (N2 + t.Tj - 1) / t.Tj;
    const int64_t pairs = symmetric ? t.nI * (t.nI + 1) / 2 : t.nI * t.nJ;
    if (pairs >= kTilesPerThread * n_threads || rows / 2 < kMinTileRows) break;
  }
  for (int64_t bi = 0; bi < t.nI; ++bi)
    for (int64_t bj = symmetric ? bi : 0; bj < t.nJ; ++bj) t.pairs.emplace_back(bi, bj);
  return t;
}

// acc[(ii, a), (jj, b)] += G[(ii, a), (jj, b)] * C[i0 + ii, j0 + jj (, a, b)]: the accumulator
// has the GEMM's layout, so the epilogue streams both rows (vectorisable; the K2 == 1 case of the
// dNTK's single-output terms is a plain row product) and the [i, j, a, b] transposition happens
// once per tile in write_back, not once per term.
template <typename scalar_t, typename acc_t>
void epilogue(acc_t* __restrict__ acc, const acc_t* __restrict__ G, const CpuTerm& term, int64_t i0,
              int64_t ti, int64_t j0, int64_t tj, int64_t K1, int64_t K2) {
  const int64_t S = tj * K2;
  const scalar_t* C = static_cast<const scalar_t*>(term.c);
  if (term.c_mode == CMode::kNone) {
    const int64_t n = ti * K1 * S;
    for (int64_t q = 0; q < n; ++q) acc[q] += G[q];
    return;
  }
  for (int64_t ii = 0; ii < ti; ++ii) {
    for (int64_t a = 0; a < K1; ++a) {
      const int64_t row = (ii * K1 + a) * S;
      acc_t* __restrict__ ap = acc + row;
      const acc_t* __restrict__ gp = G + row;
      if (term.c_mode == CMode::kPair) {
        const scalar_t* cp = C + (i0 + ii) * term.cs[0] + j0 * term.cs[1];
        const int64_t cj = term.cs[1];
        if (K2 == 1) {
          for (int64_t jj = 0; jj < tj; ++jj) ap[jj] += gp[jj] * static_cast<acc_t>(cp[jj * cj]);
        } else {
          for (int64_t jj = 0; jj < tj; ++jj) {
            const acc_t c = static_cast<acc_t>(cp[jj * cj]);
            for (int64_t b = 0; b < K2; ++b) ap[jj * K2 + b] += gp[jj * K2 + b] * c;
          }
        }
      } else {
        const scalar_t* cp = C + (i0 + ii) * term.cs[0] + j0 * term.cs[1] + a * term.cs[2];
        const int64_t cj = term.cs[1], cb = term.cs[3];
        for (int64_t jj = 0; jj < tj; ++jj)
          for (int64_t b = 0; b < K2; ++b)
            ap[jj * K2 + b] += gp[jj * K2 + b] * static_cast<acc_t>(cp[jj * cj + b * cb]);
      }
    }
  }
}

// out[i0 + ii, j0 + jj, a, b] += acc[(ii, a), (jj, b)] (one rounding), with the symmetric mirror.
template <typename scalar_t, typename acc_t>
void write_back(scalar_t* out, const acc_t* acc, const Tiling& tl, int64_t i0, int64_t ti,
                int64_t j0, int64_t tj, bool diagonal) {
  const int64_t K1 = tl.K1, K2 = tl.K2, KK = K1 * K2, S = tj * K2;
  for (int64_t ii = 0; ii < ti; ++ii) {
    const int64_t i = i0 + ii;
    for (int64_t jj = 0; jj < tj; ++jj) {
      const int64_t j = j0 + jj;
      if (tl.symmetric && diagonal && i > j) continue;
      scalar_t* op = out + (i * tl.N2 + j) * KK;
      const acc_t* ap = acc + ii * K1 * S + jj * K2;  // acc[(ii, a), (jj, b)] = ap[a * S + b]
      for (int64_t a = 0; a < K1; ++a)
        for (int64_t b = 0; b < K2; ++b)
          op[a * K2 + b] = static_cast<scalar_t>(static_cast<acc_t>(op[a * K2 + b]) + ap[a * S + b]);
      if (tl.symmetric && i < j) {
        scalar_t* mp = out + (j * tl.N2 + i) * KK;  // out[j, i, b, a]
        for (int64_t a = 0; a < K1; ++a)
          for (int64_t b = 0; b < K2; ++b)
            mp[b * K1 + a] = static_cast<scalar_t>(static_cast<acc_t>(mp[b * K1 + a]) + ap[a * S + b]);
      }
    }
  }
}

// Per-worker buffers and the work of one tile pair.
template <typename scalar_t, typename acc_t>
struct TileWorker {
  const Tiling& tl;
  const std::vector<CpuTerm>& terms;
  scalar_t* out;
  at::Tensor gbuf, abuf, bbuf;  // G tile (acc_t); float64 operand chunks (fp64 mode only)
  at::Tensor acc;                // tile accumulator [(ii, a), (jj, b)] (acc_t)

  static constexpr bool kConvert = !std::is_same<scalar_t, acc_t>::value;

  TileWorker(const Tiling& tl_, const std::vector<CpuTerm>& terms_, scalar_t* out_)
      : tl(tl_), terms(terms_), out(out_) {
    const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const int64_t R = tl.Ti * tl.K1, S = tl.Tj * tl.K2;
    gbuf = at::empty({R * S}, opts);
    acc = at::empty({R * S}, opts);
    if (kConvert) {
      int64_t mmax = 0;
      for (const auto& t : terms) mmax = std::max(mmax, t.M);
      const int64_t mc = std::max<int64_t>(1, std::min(mmax, kChunkM));
      abuf = at::empty({R * mc}, opts);
      bbuf = at::empty({S * mc}, opts);
    }
  }

  // G = a_tile @ b_tile^T, a_tile [R, M], b_tile [S, M] -> g [R, S] in acc_t.
  void gram(at::Tensor& g, const at::Tensor& a_tile, const at::Tensor& b_tile, int64_t M) {
    if (!kConvert) {
      at::cpu::mm_out(g, a_tile, b_tile.t());
      return;
    }
    const int64_t R = a_tile.size(0), S = b_tile.size(0);
    for (int64_t m0 = 0; m0 < M; m0 += kChunkM) {
      const int64_t mc = std::min(kChunkM, M - m0);
      at::Tensor ad = abuf.narrow(0, 0, R * mc).view({R, mc});
      at::Tensor bd = bbuf.narrow(0, 0, S * mc).view({S, mc});
      ad.copy_(a_tile.narrow(1, m0, mc));
      bd.copy_(b_tile.narrow(1, m0, mc));
      if (m0 == 0) {
        at::cpu::mm_out(g, ad, bd.t());
      } else {
        at::cpu::addmm_out(g, g, ad, bd.t());
      }
    }
  }

  void run(int64_t bi, int64_t bj) {
    const int64_t i0 = bi * tl.Ti, ti = std::min(tl.Ti, tl.N1 - i0);
    const int64_t j0 = bj * tl.Tj, tj = std::min(tl.Tj, tl.N2 - j0);
    const int64_t R = ti * tl.K1, S = tj * tl.K2;
    at::Tensor av = acc.narrow(0, 0, R * S).view({R, S});
    av.zero_();
    at::Tensor g = gbuf.narrow(0, 0, R * S).view({R, S});
    for (const CpuTerm& term : terms) {
      if (term.M == 0) continue;
      at::Tensor a_tile = term.a_rows.narrow(0, i0 * tl.K1, R);
      at::Tensor b_tile = term.b_rows.narrow(0, j0 * tl.K2, S);
      if (!kConvert && term.c_mode == CMode::kNone) {
        at::cpu::addmm_out(av, av, a_tile, b_tile.t());  // plain Gram: BLAS accumulates (beta = 1)
        continue;
      }
      gram(g, a_tile, b_tile, term.M);
      epilogue<scalar_t, acc_t>(av.mutable_data_ptr<acc_t>(), g.const_data_ptr<acc_t>(), term, i0,
                                ti, j0, tj, tl.K1, tl.K2);
    }
    write_back<scalar_t, acc_t>(out, av.const_data_ptr<acc_t>(), tl, i0, ti, j0, tj, bi == bj);
  }
};

template <typename scalar_t, typename acc_t>
void run_tiles(const Tiling& tl, const std::vector<CpuTerm>& terms, scalar_t* out) {
  const int64_t n_pairs = static_cast<int64_t>(tl.pairs.size());
  const int64_t n_threads = at::get_num_threads();
  // multiply-adds of the whole call: below kMinParallelWork a parallel region costs more than it
  // saves (and on a busy machine a descheduled worker stalls the barrier)
  double work = 0.0;
  for (const auto& t : terms)
    work += static_cast<double>(tl.N1 * tl.K1) * static_cast<double>(tl.N2 * tl.K2) * (t.M + 1);
  if (tl.symmetric) work *= 0.5;
  if (n_threads <= 1 || n_pairs < 2 * n_threads || at::in_parallel_region() ||
      work < kMinParallelWork) {
    TileWorker<scalar_t, acc_t> w(tl, terms, out);  // BLAS may use the intra-op threads here
    for (const auto& p : tl.pairs) w.run(p.first, p.second);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, n_threads, 1, [&](int64_t, int64_t) {
    TileWorker<scalar_t, acc_t> w(tl, terms, out);
    for (int64_t k = next.fetch_add(1); k < n_pairs; k = next.fetch_add(1))
      w.run(tl.pairs[k].first, tl.pairs[k].second);
  });
}

void gram_hadamard_accumulate_cpu(at::Tensor& out, at::TensorList A, at::TensorList B,
                                  const c10::List<std::optional<at::Tensor>>& C,
                                  bool accumulate_fp64, bool symmetric) {
  std::vector<GramHadamardTerm> checked =
      check_gram_hadamard_args(out, A, B, C, symmetric, c10::DeviceType::CPU);
  if (out.numel() == 0) return;
  std::vector<CpuTerm> terms;
  terms.reserve(checked.size());
  for (GramHadamardTerm& t : checked) {
    if (t.M == 0) continue;
    CpuTerm ct;
    ct.a_rows = as_rows(t.A);
    ct.b_rows = as_rows(t.B);
    ct.M = t.M;
    ct.c_mode = t.c_mode;
    if (t.c_mode != CMode::kNone) {
      ct.c = t.C.const_data_ptr();
      for (int64_t d = 0; d < t.C.dim(); ++d) ct.cs[d] = t.C.stride(d);
    }
    terms.push_back(std::move(ct));
  }
  if (terms.empty()) return;
  const Tiling tl = make_tiling(out.size(0), out.size(1), out.size(2), out.size(3), symmetric,
                                at::get_num_threads());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), kGramHadamardOp, [&] {
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    if (accumulate_fp64) {
      run_tiles<scalar_t, double>(tl, terms, op);
    } else {
      run_tiles<scalar_t, scalar_t>(tl, terms, op);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_crit, CPU, m) {
  m.impl("gram_hadamard_accumulate_", &gram_hadamard_accumulate_cpu);
}

}  // namespace torch_crit
