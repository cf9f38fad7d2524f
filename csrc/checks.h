#pragma once
// Argument checks shared by the CPU and CUDA bindings. Messages name the op, the argument,
// what was expected and what was found.
#include <torch/library.h>

#define TC_CHECK_DIM(op, name, t, d)                                                        \
  TORCH_CHECK_VALUE((t).dim() == (d), op, ": ", name, " must have ", d, " dims, got shape ", \
                    (t).sizes())
#define TC_CHECK_SIZE(op, name, t, dim, expect)                                                   \
  TORCH_CHECK_VALUE((t).size(dim) == (expect), op, ": ", name, ".size(", dim, ") must be ", expect, \
                    " (shape ", (t).sizes(), ")")
#define TC_CHECK_SAME_DTYPE(op, name, t, ref)                                                    \
  TORCH_CHECK_TYPE((t).scalar_type() == (ref).scalar_type(), op, ": ", name, " has dtype ",       \
                   (t).scalar_type(), " but out has ", (ref).scalar_type())
#define TC_CHECK_SAME_DEVICE(op, name, t, ref)                                                   \
  TORCH_CHECK_VALUE((t).device() == (ref).device(), op, ": ", name, " is on ", (t).device(),      \
                    " but out is on ", (ref).device())
