// CPU implementation of torch_crit::gram_hadamard_accumulate_ (see csrc/registration.cpp).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "checks.h"

namespace torch_crit {
namespace {

constexpr const char* kOp = "gram_hadamard_accumulate_";

template <typename scalar_t, typename acc_t>
void accumulate_term(scalar_t* out, const scalar_t* A, const scalar_t* B, const scalar_t* C,
                     int c_mode, int64_t N1, int64_t N2, int64_t K1, int64_t K2, int64_t M) {
  at::parallel_for(0, N1, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t j = 0; j < N2; ++j) {
        for (int64_t a = 0; a < K1; ++a) {
          const scalar_t* Ar = A + (i * K1 + a) * M;
          for (int64_t b = 0; b < K2; ++b) {
            const scalar_t* Br = B + (j * K2 + b) * M;
            acc_t s = 0;
            for (int64_t q = 0; q < M; ++q) s += static_cast<acc_t>(Ar[q]) * Br[q];
            const int64_t o = ((i * N2 + j) * K1 + a) * K2 + b;
            if (c_mode == 1) s *= C[i * N2 + j];
            if (c_mode == 2) s *= C[o];
            out[o] += static_cast<scalar_t>(s);
          }
        }
      }
    }
  });
}

void gram_hadamard_accumulate_cpu(at::Tensor& out, at::TensorList A, at::TensorList B,
                                  const c10::List<std::optional<at::Tensor>>& C, bool accumulate_fp64) {
  TC_CHECK_DIM(kOp, "out", out, 4);
  TORCH_CHECK_VALUE(out.is_contiguous(), kOp, ": out must be contiguous");
  TORCH_CHECK_VALUE(A.size() == B.size() && A.size() == C.size(), kOp,
                    ": A, B and C must have the same number of terms, got ", A.size(), ", ",
                    B.size(), ", ", C.size());
  const int64_t N1 = out.size(0), N2 = out.size(1), K1 = out.size(2), K2 = out.size(3);
  for (size_t t = 0; t < A.size(); ++t) {
    at::Tensor a = A[t].contiguous(), b = B[t].contiguous();
    TC_CHECK_DIM(kOp, "A[t]", a, 3);
    TC_CHECK_DIM(kOp, "B[t]", b, 3);
    TC_CHECK_SIZE(kOp, "A[t]", a, 0, N1);
    TC_CHECK_SIZE(kOp, "A[t]", a, 1, K1);
    TC_CHECK_SIZE(kOp, "B[t]", b, 0, N2);
    TC_CHECK_SIZE(kOp, "B[t]", b, 1, K2);
    TC_CHECK_SIZE(kOp, "B[t]", b, 2, a.size(2));
    TC_CHECK_SAME_DTYPE(kOp, "A[t]", a, out);
    TC_CHECK_SAME_DTYPE(kOp, "B[t]", b, out);
    at::Tensor c;
    int c_mode = 0;
    std::optional<at::Tensor> copt = C.get(t);
    if (copt.has_value()) {
      c = copt->contiguous();
      TC_CHECK_SAME_DTYPE(kOp, "C[t]", c, out);
      if (c.dim() == 2) {
        TC_CHECK_SIZE(kOp, "C[t]", c, 0, N1);
        TC_CHECK_SIZE(kOp, "C[t]", c, 1, N2);
        c_mode = 1;
      } else {
        TC_CHECK_DIM(kOp, "C[t]", c, 4);
        TORCH_CHECK_VALUE(c.sizes() == out.sizes(), kOp, ": C[t] of 4 dims must match out ",
                          out.sizes(), ", got ", c.sizes());
        c_mode = 2;
      }
    }
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), kOp, [&] {
      const scalar_t* cp = c_mode ? c.data_ptr<scalar_t>() : nullptr;
      if (accumulate_fp64) {
        accumulate_term<scalar_t, double>(out.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
                                          b.data_ptr<scalar_t>(), cp, c_mode, N1, N2, K1, K2, a.size(2));
      } else {
        accumulate_term<scalar_t, scalar_t>(out.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
                                            b.data_ptr<scalar_t>(), cp, c_mode, N1, N2, K1, K2, a.size(2));
      }
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_crit, CPU, m) {
  m.impl("gram_hadamard_accumulate_", &gram_hadamard_accumulate_cpu);
}

}  // namespace torch_crit
