// CUDA binding of torch_crit::gram_hadamard_accumulate_: argument checks (csrc/gram_hadamard.h,
// shared with the CPU kernel), device guard, current stream, launch of the raw-pointer kernels
// of gram_hadamard_kernel.cu. Compiled only when torch has CUDA (setup.py, TORCH_CRIT_CUDA).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "cuda/gram_hadamard_kernel.h"
#include "gram_hadamard.h"

namespace torch_crit {
namespace {

void gram_hadamard_accumulate_cuda(at::Tensor& out, at::TensorList A, at::TensorList B,
                                   const c10::List<std::optional<at::Tensor>>& C,
                                   bool accumulate_fp64, bool symmetric) {
  std::vector<GramHadamardTerm> checked =
      check_gram_hadamard_args(out, A, B, C, symmetric, c10::DeviceType::CUDA);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard device_guard(out.device());
  std::vector<at::Tensor> keep;  // contiguous copies live until the launch is enqueued
  std::vector<cuda::GramHadamardTermArgs> args;
  args.reserve(checked.size());
  for (GramHadamardTerm& t : checked) {
    if (t.M == 0) continue;
    // The kernel reads the inner dimension along consecutive threads: give it unit stride.
    at::Tensor a = t.A.stride(2) == 1 ? t.A : t.A.contiguous();
    at::Tensor b = t.B.stride(2) == 1 ? t.B : t.B.contiguous();
    keep.push_back(a);
    keep.push_back(b);
    cuda::GramHadamardTermArgs arg{};
    arg.A = a.const_data_ptr();
    arg.B = b.const_data_ptr();
    for (int d = 0; d < 3; ++d) {
      arg.a_stride[d] = a.stride(d);
      arg.b_stride[d] = b.stride(d);
    }
    arg.M = t.M;
    arg.c_mode = static_cast<int>(t.c_mode);
    arg.C = nullptr;
    if (t.c_mode != CMode::kNone) {
      arg.C = t.C.const_data_ptr();
      for (int64_t d = 0; d < t.C.dim(); ++d) arg.c_stride[d] = t.C.stride(d);
    }
    args.push_back(arg);
  }
  if (args.empty()) return;
  const auto dtype = out.scalar_type() == at::kDouble ? cuda::GramHadamardDtype::kFloat64
                                                      : cuda::GramHadamardDtype::kFloat32;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out.get_device()).stream();
  const cudaError_t err = cuda::launch_gram_hadamard_accumulate(
      dtype, accumulate_fp64, symmetric, out.mutable_data_ptr(), out.size(0), out.size(1),
      out.size(2), out.size(3), args.data(), static_cast<int>(args.size()), stream);
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_crit, CUDA, m) {
  m.impl("gram_hadamard_accumulate_", &gram_hadamard_accumulate_cuda);
}

}  // namespace torch_crit
