// The vitos operator namespace and the argument checks shared by every op.
// Each op defines its schema next to its CPU kernel (TORCH_LIBRARY_FRAGMENT); this file owns the namespace.
#include "vitos.h"

#include <torch/library.h>

namespace vitos {

void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, op, ": ", name, " must be ", c10::toString(dtype), ", got ",
                    t.scalar_type());
}

void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                       const char* op) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", a_name, " and ", b_name,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

}  // namespace vitos

TORCH_LIBRARY(vitos, m) {}
