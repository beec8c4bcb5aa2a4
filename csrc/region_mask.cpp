// vitos::region_to_patch_mask: schema, argument checks and the CPU kernel.
//
// Marks the visual tokens that lie inside any evidence box of their image (DESIGN.md, "region_to_patch_mask").
// The CPU kernel paints each valid box's (dilated) cell rectangle into frame 0 of its image, fills images that have
// no valid box, then copies frame 0 to the image's other frames.
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "vitos.h"

namespace vitos {

namespace {
constexpr const char* kOp = "region_to_patch_mask";
}

void check_region_mask_args(const at::Tensor& boxes, const at::Tensor& box_image, const at::Tensor& grid_thw,
                            int64_t merge_size, int64_t dilate, std::optional<int64_t> num_tokens) {
  check_dtype(boxes, at::kFloat, kOp, "boxes");
  check_dim(boxes, 2, kOp, "boxes");
  TORCH_CHECK_VALUE(boxes.size(1) == 4, kOp, ": boxes must have shape [N, 4], got ", boxes.sizes());
  check_dtype(box_image, at::kLong, kOp, "box_image");
  check_dim(box_image, 1, kOp, "box_image");
  TORCH_CHECK_VALUE(box_image.size(0) == boxes.size(0), kOp, ": box_image must have one entry per box (",
                    boxes.size(0), "), got ", box_image.size(0));
  check_dtype(grid_thw, at::kLong, kOp, "grid_thw");
  check_dim(grid_thw, 2, kOp, "grid_thw");
  TORCH_CHECK_VALUE(grid_thw.size(1) == 3, kOp, ": grid_thw must have shape [I, 3], got ", grid_thw.sizes());
  check_same_device(boxes, "boxes", grid_thw, "grid_thw", kOp);
  check_same_device(box_image, "box_image", grid_thw, "grid_thw", kOp);
  TORCH_CHECK_VALUE(merge_size >= 1, kOp, ": merge_size must be >= 1, got ", merge_size);
  TORCH_CHECK_VALUE(dilate >= 0, kOp, ": dilate must be >= 0, got ", dilate);
  TORCH_CHECK_VALUE(!num_tokens.has_value() || *num_tokens >= 0, kOp, ": num_tokens must be >= 0, got ",
                    num_tokens.value_or(0));
}

int64_t check_region_mask_values(const at::Tensor& box_image_cpu, const at::Tensor& grid_thw_cpu,
                                 int64_t merge_size, std::optional<int64_t> num_tokens) {
  const int64_t num_images = grid_thw_cpu.size(0);
  const auto grid = grid_thw_cpu.contiguous();
  const int64_t* g = grid.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t i = 0; i < num_images; ++i) {
    const int64_t t = g[3 * i], h = g[3 * i + 1], w = g[3 * i + 2];
    TORCH_CHECK_VALUE(t >= 1 && h >= 1 && w >= 1, kOp, ": grid_thw[", i, "] = (", t, ", ", h, ", ", w,
                      ") must be positive");
    TORCH_CHECK_VALUE(h % merge_size == 0 && w % merge_size == 0, kOp, ": grid_thw[", i, "] = (", t, ", ", h,
                      ", ", w, "): h and w must be divisible by merge_size=", merge_size);
    total += t * (h / merge_size) * (w / merge_size);
  }
  const auto images = box_image_cpu.contiguous();
  const int64_t* b = images.data_ptr<int64_t>();
  for (int64_t n = 0; n < images.numel(); ++n) {
    TORCH_CHECK_VALUE(b[n] >= 0 && b[n] < num_images, kOp, ": box_image[", n, "] = ", b[n],
                      " is out of range for ", num_images, " images (grid_thw rows)");
  }
  TORCH_CHECK_VALUE(!num_tokens.has_value() || *num_tokens == total, kOp, ": num_tokens=", num_tokens.value_or(0),
                    " but grid_thw and merge_size give ", total, " tokens");
  return total;
}

namespace {

at::Tensor region_to_patch_mask_cpu(const at::Tensor& boxes, const at::Tensor& box_image, const at::Tensor& grid_thw,
                                    int64_t merge_size, int64_t dilate, std::optional<int64_t> num_tokens) {
  check_region_mask_args(boxes, box_image, grid_thw, merge_size, dilate, num_tokens);
  const int64_t total = check_region_mask_values(box_image, grid_thw, merge_size, num_tokens);
  auto out = at::zeros({total}, grid_thw.options().dtype(at::kBool));
  bool* mask = out.data_ptr<bool>();

  const auto grid_c = grid_thw.contiguous();
  const int64_t* g = grid_c.data_ptr<int64_t>();
  const int64_t num_images = grid_thw.size(0);
  std::vector<int64_t> offset(num_images + 1, 0);
  for (int64_t i = 0; i < num_images; ++i) {
    offset[i + 1] = offset[i] + g[3 * i] * (g[3 * i + 1] / merge_size) * (g[3 * i + 2] / merge_size);
  }

  // Paint every valid box into frame 0 of its image.
  std::vector<char> has_box(num_images, 0);
  const auto boxes_c = boxes.contiguous();
  const auto images_c = box_image.contiguous();
  const float* bx = boxes_c.data_ptr<float>();
  const int64_t* bi = images_c.data_ptr<int64_t>();
  for (int64_t n = 0; n < boxes.size(0); ++n) {
    const int64_t img = bi[n];
    const int32_t rows = static_cast<int32_t>(g[3 * img + 1] / merge_size);
    const int32_t cols = static_cast<int32_t>(g[3 * img + 2] / merge_size);
    CellRect rect;
    if (!box_to_cells(bx[4 * n], bx[4 * n + 1], bx[4 * n + 2], bx[4 * n + 3], rows, cols, &rect)) continue;
    has_box[img] = 1;
    // A square dilation of a union of rectangles is the union of the grown rectangles.
    const int64_t r0 = std::max<int64_t>(rect.r_lo - dilate, 0), r1 = std::min<int64_t>(rect.r_hi + dilate, rows - 1);
    const int64_t c0 = std::max<int64_t>(rect.c_lo - dilate, 0), c1 = std::min<int64_t>(rect.c_hi + dilate, cols - 1);
    bool* frame = mask + offset[img];
    for (int64_t r = r0; r <= r1; ++r) std::memset(frame + r * cols + c0, 1, c1 - c0 + 1);
  }

  // Images without a valid box keep everything; then every frame repeats frame 0.
  for (int64_t i = 0; i < num_images; ++i) {
    const int64_t frame_size = (g[3 * i + 1] / merge_size) * (g[3 * i + 2] / merge_size);
    bool* first = mask + offset[i];
    if (!has_box[i]) std::memset(first, 1, frame_size);
    for (int64_t f = 1; f < g[3 * i]; ++f) std::memcpy(first + f * frame_size, first, frame_size);
  }
  return out;
}

}  // namespace
}  // namespace vitos

TORCH_LIBRARY_FRAGMENT(vitos, m) {
  m.def(
      "region_to_patch_mask(Tensor boxes, Tensor box_image, Tensor grid_thw, int merge_size=2, int dilate=0, "
      "SymInt? num_tokens=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(vitos, CPU, m) { m.impl("region_to_patch_mask", &vitos::region_to_patch_mask_cpu); }
