// Shared declarations of the vitos ops: input checks used by the CPU and CUDA implementations alike, and the
// box -> token-cell rule, written once for host and device so both paths round exactly the same way.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#if defined(__CUDACC__)
#define VITOS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define VITOS_HOST_DEVICE inline
#endif

#if defined(__CUDA_ARCH__)
#define VITOS_ISFINITE(x) isfinite(x)
#else
#define VITOS_ISFINITE(x) std::isfinite(x)
#endif

namespace vitos {

// ---------------------------------------------------------------- argument checks (messages name the argument)
void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* op, const char* name);
void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name);
void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                       const char* op);

// ---------------------------------------------------------------- region_to_patch_mask
// Token-grid cells [r_lo, r_hi] x [c_lo, c_hi] (inclusive) covered by a normalized box, per DESIGN.md. Returns
// false when the box is invalid (a non-finite coordinate, or inverted after clamping to [0, 1]).
struct CellRect {
  int32_t r_lo, r_hi, c_lo, c_hi;
};

VITOS_HOST_DEVICE int32_t clamp_cell(float v, int32_t n) {
  // v is an integral float (floor/ceil result); compare in float so huge values cannot overflow an int cast.
  if (!(v > 0.0f)) return 0;
  if (v > static_cast<float>(n - 1)) return n - 1;
  return static_cast<int32_t>(v);
}

VITOS_HOST_DEVICE void cell_span(float lo, float hi, int32_t n, int32_t* first, int32_t* last) {
  const float fn = static_cast<float>(n);
  const int32_t f = clamp_cell(floorf(lo * fn), n);
  float l = ceilf(hi * fn) - 1.0f;
  if (l < static_cast<float>(f)) l = static_cast<float>(f);
  *first = f;
  *last = clamp_cell(l, n);
}

VITOS_HOST_DEVICE bool box_to_cells(float x1, float y1, float x2, float y2, int32_t rows, int32_t cols,
                                    CellRect* rect) {
  if (!(VITOS_ISFINITE(x1) && VITOS_ISFINITE(y1) && VITOS_ISFINITE(x2) && VITOS_ISFINITE(y2))) return false;
  x1 = fminf(fmaxf(x1, 0.0f), 1.0f);
  y1 = fminf(fmaxf(y1, 0.0f), 1.0f);
  x2 = fminf(fmaxf(x2, 0.0f), 1.0f);
  y2 = fminf(fmaxf(y2, 0.0f), 1.0f);
  if (x2 < x1 || y2 < y1) return false;
  cell_span(y1, y2, rows, &rect->r_lo, &rect->r_hi);
  cell_span(x1, x2, cols, &rect->c_lo, &rect->c_hi);
  return true;
}

// Metadata checks (shapes, dtypes, devices, scalar arguments); no tensor values are read.
void check_region_mask_args(const at::Tensor& boxes, const at::Tensor& box_image, const at::Tensor& grid_thw,
                            int64_t merge_size, int64_t dilate, std::optional<int64_t> num_tokens);

// Value checks on host copies of box_image and grid_thw; returns the number of output tokens.
int64_t check_region_mask_values(const at::Tensor& box_image_cpu, const at::Tensor& grid_thw_cpu,
                                 int64_t merge_size, std::optional<int64_t> num_tokens);

// ---------------------------------------------------------------- compact_tokens
// Error bits found while planning a compaction (the CUDA plan reports them in one word).
enum CompactError : int32_t {
  kCuSeqlensFirst = 1,      // cu_seqlens[0] != 0
  kCuSeqlensOrder = 2,      // cu_seqlens decreases
  kCuSeqlensLast = 4,       // cu_seqlens[-1] != number of rows
  kFuseOutOfRange = 8,      // fuse_into target outside [0, T)
  kFuseNotKept = 16,        // fuse_into target is a dropped row
  kFuseOtherSequence = 32,  // fuse_into target lies in another sequence
  kCapacityExceeded = 64,   // more kept rows than out_capacity
};

// Throws a ValueError describing the first error bit set in `errors`.
void raise_compact_errors(int32_t errors, int64_t out_capacity);

void check_compact_args(const at::Tensor& hidden, const at::Tensor& keep, const at::Tensor& cu_seqlens,
                        const at::Tensor& position_ids, const std::optional<at::Tensor>& fuse_into,
                        std::optional<int64_t> out_capacity);

void check_compact_backward_args(const at::Tensor& grad_out, const at::Tensor& dest_row,
                                 const at::Tensor& fuse_count);

// Sequence containing row `row` given monotone offsets cu[0..num_seq]: the last b with cu[b] <= row < cu[b+1].
VITOS_HOST_DEVICE int64_t sequence_of(const int32_t* cu, int64_t num_seq, int64_t row) {
  int64_t lo = 0, hi = num_seq - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (cu[mid] <= row) lo = mid; else hi = mid - 1;
  }
  return lo;
}

}  // namespace vitos
