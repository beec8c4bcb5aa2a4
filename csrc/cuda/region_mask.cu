// CUDA kernel of vitos::region_to_patch_mask: the whole batch in one launch, one thread per output token.
//
// Every block recomputes the per-image token offsets (a handful of images) and the cell rectangles of the boxes
// into shared memory, then each thread tests its token against the rectangles of its image. With num_tokens given,
// nothing is read back to the host; bad values then trip a device-side assertion naming the argument.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../vitos.h"

namespace vitos {
namespace {

constexpr int kThreads = 256;
constexpr int kBoxChunk = 512;  // boxes staged in shared memory at a time

struct GrownRect {
  int32_t image;  // -1 for an invalid box
  int32_t r_lo, r_hi, c_lo, c_hi;
};

__device__ int64_t image_of(const int64_t* offset, int64_t num_images, int64_t token) {
  int64_t lo = 0, hi = num_images - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (offset[mid] <= token) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__global__ void region_mask_kernel(const float* __restrict__ boxes, const int64_t* __restrict__ box_image,
                                   const int64_t* __restrict__ grid, int64_t num_boxes, int64_t num_images,
                                   int32_t merge, int32_t dilate, int64_t num_tokens, bool* __restrict__ out) {
  extern __shared__ int64_t smem[];
  int64_t* offset = smem;                                            // [I + 1] first token of each image
  int32_t* has_box = reinterpret_cast<int32_t*>(offset + num_images + 1);  // [I]
  GrownRect* rects = reinterpret_cast<GrownRect*>(has_box + num_images);   // [kBoxChunk]

  for (int64_t i = threadIdx.x; i < num_images; i += blockDim.x) has_box[i] = 0;
  if (threadIdx.x == 0) {
    offset[0] = 0;
    for (int64_t i = 0; i < num_images; ++i) {
      const int64_t t = grid[3 * i], h = grid[3 * i + 1], w = grid[3 * i + 2];
      CUDA_KERNEL_ASSERT_MSG(t >= 1 && h >= 1 && w >= 1 && h % merge == 0 && w % merge == 0,
                             "region_to_patch_mask: grid_thw rows must be positive with h, w divisible by merge_size");
      offset[i + 1] = offset[i] + t * (h / merge) * (w / merge);
    }
    CUDA_KERNEL_ASSERT_MSG(offset[num_images] == num_tokens,
                           "region_to_patch_mask: num_tokens does not match grid_thw and merge_size");
  }
  __syncthreads();

  const int64_t token = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const bool active = token < num_tokens;
  int64_t image = 0;
  int32_t row = 0, col = 0;
  if (active) {
    image = image_of(offset, num_images, token);
    const int32_t cols = static_cast<int32_t>(grid[3 * image + 2] / merge);
    const int64_t frame = (grid[3 * image + 1] / merge) * cols;
    const int64_t cell = (token - offset[image]) % frame;  // every frame uses the same 2-D mask
    row = static_cast<int32_t>(cell / cols);
    col = static_cast<int32_t>(cell % cols);
  }

  bool inside = false;
  for (int64_t start = 0; start < num_boxes; start += kBoxChunk) {
    const int64_t chunk = min(static_cast<int64_t>(kBoxChunk), num_boxes - start);
    __syncthreads();  // the previous chunk is no longer read
    for (int64_t b = threadIdx.x; b < chunk; b += blockDim.x) {
      const int64_t n = start + b;
      const int64_t img = box_image[n];
      CUDA_KERNEL_ASSERT_MSG(img >= 0 && img < num_images, "region_to_patch_mask: box_image is out of range");
      const int32_t rows = static_cast<int32_t>(grid[3 * img + 1] / merge);
      const int32_t cols = static_cast<int32_t>(grid[3 * img + 2] / merge);
      CellRect r;
      GrownRect g{-1, 0, 0, 0, 0};
      if (box_to_cells(boxes[4 * n], boxes[4 * n + 1], boxes[4 * n + 2], boxes[4 * n + 3], rows, cols, &r)) {
        // Growing each rectangle by `dilate` cells is the square dilation of their union; no clipping is needed
        // since a thread's own cell always lies inside the grid.
        g = GrownRect{static_cast<int32_t>(img), r.r_lo - dilate, r.r_hi + dilate, r.c_lo - dilate, r.c_hi + dilate};
        has_box[img] = 1;
      }
      rects[b] = g;
    }
    __syncthreads();
    if (active && !inside) {
      for (int64_t b = 0; b < chunk; ++b) {
        const GrownRect g = rects[b];
        if (g.image == image && row >= g.r_lo && row <= g.r_hi && col >= g.c_lo && col <= g.c_hi) {
          inside = true;
          break;
        }
      }
    }
  }
  __syncthreads();
  if (active) out[token] = inside || !has_box[image];  // an image without a valid box keeps everything
}

at::Tensor region_to_patch_mask_cuda(const at::Tensor& boxes_in, const at::Tensor& box_image_in,
                                     const at::Tensor& grid_thw_in, int64_t merge_size, int64_t dilate,
                                     std::optional<int64_t> num_tokens) {
  check_region_mask_args(boxes_in, box_image_in, grid_thw_in, merge_size, dilate, num_tokens);
  const c10::cuda::CUDAGuard guard(grid_thw_in.device());
  const auto boxes = boxes_in.contiguous();
  const auto box_image = box_image_in.contiguous();
  const auto grid_thw = grid_thw_in.contiguous();
  const int64_t num_images = grid_thw.size(0), num_boxes = boxes.size(0);

  int64_t total = 0;
  if (num_tokens.has_value()) {
    total = *num_tokens;  // sync-free: the kernel asserts the values instead
  } else {
    // One device->host copy gives the output size and lets every value be checked with a clear message.
    const auto host = at::cat({grid_thw.flatten(), box_image}).cpu();
    const auto host_grid = host.narrow(0, 0, num_images * 3).view({num_images, 3});
    total = check_region_mask_values(host.narrow(0, num_images * 3, num_boxes), host_grid, merge_size, std::nullopt);
  }
  auto out = at::empty({total}, grid_thw.options().dtype(at::kBool));
  if (num_images == 0) {  // shapes alone decide this case
    TORCH_CHECK_VALUE(num_boxes == 0, "region_to_patch_mask: box_image is out of range for 0 images (grid_thw rows)");
    TORCH_CHECK_VALUE(total == 0, "region_to_patch_mask: num_tokens=", total, " but grid_thw has no images");
    return out;
  }

  const size_t smem = (num_images + 1) * sizeof(int64_t) + num_images * sizeof(int32_t) + kBoxChunk * sizeof(GrownRect);
  const int64_t smem_limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK_VALUE(static_cast<int64_t>(smem) <= smem_limit, "region_to_patch_mask: too many images (", num_images,
                    ") for one launch on this device");
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(region_mask_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  // At least one block, so that the device-side value checks run even for an empty output.
  const int64_t blocks = std::max<int64_t>(1, (total + kThreads - 1) / kThreads);
  const int32_t grow = static_cast<int32_t>(std::min<int64_t>(dilate, 1 << 24));  // beyond any grid: no overflow
  region_mask_kernel<<<blocks, kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      boxes.data_ptr<float>(), box_image.data_ptr<int64_t>(), grid_thw.data_ptr<int64_t>(), num_boxes, num_images,
      static_cast<int32_t>(merge_size), grow, total, out.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace vitos

TORCH_LIBRARY_IMPL(vitos, CUDA, m) { m.impl("region_to_patch_mask", &vitos::region_to_patch_mask_cuda); }
