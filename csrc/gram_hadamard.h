#pragma once
// Argument validation of torch_crit::gram_hadamard_accumulate_, shared by the CPU
// (csrc/cpu/gram_hadamard.cpp) and CUDA (csrc/cuda/gram_hadamard_cuda.cpp) bindings, so both
// backends accept exactly the same calls and fail with exactly the same messages.
//
//   out[i, j, a, b] += sum_t sum_m A_t[i, a, m] * B_t[j, b, m] * C_t[i, j (, a, b)]
//   out [N1, N2, K1, K2] (contiguous), A_t [N1, K1, M_t], B_t [N2, K2, M_t],
//   C_t: None (ones), [N1, N2] or [N1, N2, K1, K2] (any strides, broadcast views welcome).
//   symmetric=True: only the pairs i <= j are computed; out[j, i, b, a] for i < j receives the
//   value computed for out[i, j, a, b] (needs N1 == N2 and K1 == K2).
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "checks.h"

namespace torch_crit {

constexpr const char* kGramHadamardOp = "gram_hadamard_accumulate_";

// How C_t enters: no factor, one factor per sample pair (i, j), one per (i, j, a, b).
enum class CMode : int { kNone = 0, kPair = 1, kFull = 2 };

struct GramHadamardTerm {
  at::Tensor A;  // [N1, K1, M]
  at::Tensor B;  // [N2, K2, M]
  at::Tensor C;  // undefined (kNone), [N1, N2] (kPair) or [N1, N2, K1, K2] (kFull)
  CMode c_mode = CMode::kNone;
  int64_t M = 0;
};

inline std::string term_name(const char* what, size_t t) {
  return std::string(what) + "[" + std::to_string(t) + "]";
}

// Validates every argument against `out` and returns the terms (tensors unchanged: the
// backends decide themselves whether they need a contiguous copy).
inline std::vector<GramHadamardTerm> check_gram_hadamard_args(
    const at::Tensor& out, at::TensorList A, at::TensorList B,
    const c10::List<std::optional<at::Tensor>>& C, bool symmetric, c10::DeviceType device_type) {
  const char* op = kGramHadamardOp;
  TC_CHECK_DIM(op, "out", out, 4);
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble, op,
                   ": out has dtype ", out.scalar_type(),
                   "; supported are float32 and float64 (cast out, A, B and C with .float() or "
                   ".double())");
  TORCH_CHECK_VALUE(out.device().type() == device_type, op, ": out is on ", out.device(),
                    " but this is the ", c10::DeviceTypeName(device_type),
                    " kernel; put every tensor on one device");
  TORCH_CHECK_VALUE(out.is_contiguous(), op, ": out must be contiguous (strides ", out.strides(),
                    " for shape ", out.sizes(), "); accumulate into a contiguous buffer and copy");
  TORCH_CHECK_VALUE(A.size() == B.size() && A.size() == C.size(), op,
                    ": A, B and C must have one entry per term, got ", A.size(), ", ", B.size(),
                    " and ", C.size(), " entries (use None in C for terms without a factor)");
  const int64_t N1 = out.size(0), N2 = out.size(1), K1 = out.size(2), K2 = out.size(3);
  if (symmetric) {
    TORCH_CHECK_VALUE(N1 == N2 && K1 == K2, op,
                      ": symmetric=True needs out of shape [N, N, K, K], got ", out.sizes(),
                      "; call with symmetric=False");
  }
  std::vector<GramHadamardTerm> terms;
  terms.reserve(A.size());
  for (size_t t = 0; t < A.size(); ++t) {
    const at::Tensor& a = A[t];
    const at::Tensor& b = B[t];
    const std::string an = term_name("A", t), bn = term_name("B", t), cn = term_name("C", t);
    TC_CHECK_DIM(op, an, a, 3);
    TC_CHECK_DIM(op, bn, b, 3);
    TC_CHECK_SAME_DEVICE(op, an, a, out);
    TC_CHECK_SAME_DEVICE(op, bn, b, out);
    TC_CHECK_SAME_DTYPE(op, an, a, out);
    TC_CHECK_SAME_DTYPE(op, bn, b, out);
    TC_CHECK_SIZE(op, an, a, 0, N1);
    TC_CHECK_SIZE(op, an, a, 1, K1);
    TC_CHECK_SIZE(op, bn, b, 0, N2);
    TC_CHECK_SIZE(op, bn, b, 1, K2);
    TC_CHECK_SIZE(op, bn, b, 2, a.size(2));
    at::assert_no_overlap(out, a);
    at::assert_no_overlap(out, b);
    GramHadamardTerm term;
    term.A = a;
    term.B = b;
    term.M = a.size(2);
    std::optional<at::Tensor> copt = C.get(t);
    if (copt.has_value() && copt->defined()) {
      const at::Tensor& c = *copt;
      TC_CHECK_SAME_DEVICE(op, cn, c, out);
      TC_CHECK_SAME_DTYPE(op, cn, c, out);
      if (c.dim() == 2) {
        TC_CHECK_SIZE(op, cn, c, 0, N1);
        TC_CHECK_SIZE(op, cn, c, 1, N2);
        term.c_mode = CMode::kPair;
      } else {
        TORCH_CHECK_VALUE(c.dim() == 4, op, ": ", cn, " must be None, [N1, N2] = [", N1, ", ",
                          N2, "] or [N1, N2, K1, K2] = ", out.sizes(), ", got shape ", c.sizes());
        TORCH_CHECK_VALUE(c.sizes() == out.sizes(), op, ": ", cn, " of 4 dims must match out ",
                          out.sizes(), ", got ", c.sizes());
        term.c_mode = CMode::kFull;
      }
      at::assert_no_overlap(out, c);
      term.C = c;
    }
    terms.push_back(std::move(term));
  }
  return terms;
}

}  // namespace torch_crit
