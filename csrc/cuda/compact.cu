// CUDA kernels of vitos::compact_tokens and vitos::compact_tokens_backward.
//
// Forward: an inclusive scan of `keep` (ATen/CUB), one plan kernel (destination of every row, new cu_seqlens,
// fusion counts, error bits, kept count and max length in a 4-word summary), one read-back of that summary (the
// only host sync; none with out_capacity, where errors trip device assertions instead), then one gather kernel:
// a warp per output row, 16-byte accesses, positions and padding rows written in the same pass. With fusion, the
// fused sources of each output row are ordered by a stable sort, so the float32 (float64) sum runs in increasing source
// order: bitwise deterministic and equal to the CPU kernel.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>

#include "../vitos.h"

namespace vitos {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;

// Summary words read back by the host.
enum Summary { kKept = 0, kMaxSeqlen = 1, kErrors = 2, kSummaryWords = 4 };

struct PlanArgs {
  const bool* keep;
  const int32_t* keep_incl;  // inclusive scan of keep
  const int32_t* cu;
  const int64_t* fuse;       // nullptr without fusion
  int64_t rows, num_seq, capacity;
  bool assert_errors;        // sync-free mode: no read-back, so errors must fail on the device
  int64_t* kept_index;       // [capacity]
  int64_t* dest_row;         // [rows]
  int32_t* fuse_count;       // [capacity] (fusion only)
  int32_t* fuse_key;         // [rows] output row a fused source feeds, INT_MAX otherwise (fusion only)
  int32_t* new_cu;           // [num_seq + 1]
  int32_t* summary;          // [kSummaryWords], zeroed
};

__device__ __forceinline__ int32_t kept_before(const PlanArgs& a, int64_t row) {
  // Number of kept rows in [0, row); row is clamped so that malformed cu_seqlens cannot read out of bounds.
  row = row < 0 ? 0 : (row > a.rows ? a.rows : row);
  return row == 0 ? 0 : a.keep_incl[row - 1];
}

__device__ void report(const PlanArgs& a, int32_t error) {
  if (a.assert_errors) {
    CUDA_KERNEL_ASSERT_MSG(error == 0, "compact_tokens: invalid cu_seqlens / fuse_into, or out_capacity exceeded "
                                       "(call without out_capacity for a descriptive error)");
  }
  if (error) atomicOr(a.summary + kErrors, error);
}

__global__ void plan_kernel(PlanArgs a) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i <= a.num_seq) {  // sequence offsets, their checks and the longest compacted sequence
    int32_t error = 0;
    const int32_t start = a.cu[i];
    if (i == 0 && start != 0) error |= kCuSeqlensFirst;
    if (i == a.num_seq && start != a.rows) error |= kCuSeqlensLast;
    a.new_cu[i] = kept_before(a, start);
    if (i < a.num_seq) {
      const int32_t end = a.cu[i + 1];
      if (end < start) error |= kCuSeqlensOrder;
      atomicMax(a.summary + kMaxSeqlen, kept_before(a, end) - kept_before(a, start));
    }
    if (i == a.num_seq) a.summary[kKept] = kept_before(a, a.rows);
    report(a, error);
  }
  if (i >= a.rows) return;

  if (a.keep[i]) {
    const int64_t r = a.keep_incl[i] - 1;
    a.dest_row[i] = r;
    if (r < a.capacity) a.kept_index[r] = i;
    report(a, r < a.capacity ? 0 : kCapacityExceeded);
    if (a.fuse) a.fuse_key[i] = INT_MAX;
    return;
  }
  a.dest_row[i] = -1;
  if (!a.fuse) return;
  a.fuse_key[i] = INT_MAX;
  const int64_t k = a.fuse[i];
  if (k < 0) return;  // discarded
  int32_t error = 0;
  if (k >= a.rows) error = kFuseOutOfRange;
  else if (!a.keep[k]) error = kFuseNotKept;
  else if (sequence_of(a.cu, a.num_seq, i) != sequence_of(a.cu, a.num_seq, k)) error = kFuseOtherSequence;
  report(a, error);
  if (error) return;
  const int64_t r = a.keep_incl[k] - 1;
  a.dest_row[i] = r;
  if (r < a.capacity) {
    a.fuse_key[i] = static_cast<int32_t>(r);
    atomicAdd(a.fuse_count + r, 1);  // integer counts: order-independent
  }
}

// 16-byte packs when every row start is 16-byte aligned, else single elements.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename scalar_t, int VEC>
struct GatherArgs {
  const scalar_t* x;           // [rows, dim]
  const int64_t* pos;          // [P, rows]
  const int64_t* kept_index;   // [capacity]
  const int32_t* summary;      // kept count
  const int32_t* fuse_count;   // [capacity] or nullptr
  const int32_t* fuse_start;   // [capacity] inclusive scan of fuse_count
  const int64_t* fuse_source;  // [rows] rows ordered by fuse_key (stable)
  int64_t rows, dim, num_pos, capacity;
  scalar_t* out;               // [capacity, dim]
  int64_t* pos_out;            // [P, capacity]
  int64_t* kept_index_out;     // [capacity]: -1 on padding rows
};

template <typename scalar_t, int VEC>
__global__ void gather_kernel(GatherArgs<scalar_t, VEC> a) {
  using P = Pack<scalar_t, VEC>;
  using acc_t = at::opmath_type<scalar_t>;  // float32 sums (float64 for float64 input)
  const int lane = threadIdx.x % 32;
  const int64_t packs = a.dim / VEC;
  const int64_t kept = a.summary[kKept];
  for (int64_t r = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / 32; r < a.capacity;
       r += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    P* dst = reinterpret_cast<P*>(a.out + r * a.dim);
    if (r >= kept) {  // padding row of the out_capacity form
      P zero;
      for (int e = 0; e < VEC; ++e) zero.v[e] = scalar_t(0);
      for (int64_t p = lane; p < packs; p += 32) dst[p] = zero;
      for (int64_t q = lane; q < a.num_pos; q += 32) a.pos_out[q * a.capacity + r] = 0;
      if (lane == 0) a.kept_index_out[r] = -1;
      continue;
    }
    const int64_t src = a.kept_index[r];
    for (int64_t q = lane; q < a.num_pos; q += 32) a.pos_out[q * a.capacity + r] = a.pos[q * a.rows + src];
    if (lane == 0) a.kept_index_out[r] = src;
    const P* row = reinterpret_cast<const P*>(a.x + src * a.dim);
    const int32_t fused = a.fuse_count ? a.fuse_count[r] : 0;
    if (fused == 0) {
      for (int64_t p = lane; p < packs; p += 32) dst[p] = row[p];  // x / 1 in float32 is x itself
      continue;
    }
    const int64_t first = a.fuse_start[r] - fused;
    const acc_t count = static_cast<acc_t>(1 + fused);
    for (int64_t p = lane; p < packs; p += 32) {
      acc_t acc[VEC];
      const P self = row[p];
      for (int e = 0; e < VEC; ++e) acc[e] = static_cast<acc_t>(self.v[e]);
      for (int64_t s = first; s < first + fused; ++s) {  // increasing source row: a fixed summation order
        const P other = reinterpret_cast<const P*>(a.x + a.fuse_source[s] * a.dim)[p];
        for (int e = 0; e < VEC; ++e) acc[e] += static_cast<acc_t>(other.v[e]);
      }
      P v;
      for (int e = 0; e < VEC; ++e) v.v[e] = static_cast<scalar_t>(acc[e] / count);
      dst[p] = v;
    }
  }
}

int64_t gather_blocks(int64_t rows) {
  const int64_t wanted = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t resident = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
  return std::max<int64_t>(1, std::min(wanted, resident));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename scalar_t, int VEC>
void launch_gather(const GatherArgs<scalar_t, VEC>& a) {
  gather_kernel<scalar_t, VEC><<<gather_blocks(a.capacity), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void gather(const at::Tensor& hidden, const at::Tensor& pos, const at::Tensor& kept_index, const at::Tensor& summary,
            const at::Tensor& fuse_count, const at::Tensor& fuse_start, const at::Tensor& fuse_source,
            at::Tensor& out, at::Tensor& pos_out, at::Tensor& kept_index_out) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool fused = fuse_count.defined() && fuse_count.numel() > 0;
  const int64_t dim = hidden.size(1);
  const bool vector_ok = dim % kVec == 0 && aligned16(hidden.data_ptr()) && aligned16(out.data_ptr());
  auto fill = [&](auto& a) {
    a.x = hidden.data_ptr<scalar_t>();
    a.pos = pos.data_ptr<int64_t>();
    a.kept_index = kept_index.data_ptr<int64_t>();
    a.summary = summary.data_ptr<int32_t>();
    a.fuse_count = fused ? fuse_count.data_ptr<int32_t>() : nullptr;
    a.fuse_start = fused ? fuse_start.data_ptr<int32_t>() : nullptr;
    a.fuse_source = fused ? fuse_source.data_ptr<int64_t>() : nullptr;
    a.rows = hidden.size(0);
    a.dim = dim;
    a.num_pos = pos.size(0);
    a.capacity = out.size(0);
    a.out = out.data_ptr<scalar_t>();
    a.pos_out = pos_out.data_ptr<int64_t>();
    a.kept_index_out = kept_index_out.data_ptr<int64_t>();
  };
  if (vector_ok) {
    GatherArgs<scalar_t, kVec> a;
    fill(a);
    launch_gather(a);
  } else {
    GatherArgs<scalar_t, 1> a;
    fill(a);
    launch_gather(a);
  }
}

using CompactResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, c10::SymInt>;

CompactResult compact_tokens_cuda(const at::Tensor& hidden_in, const at::Tensor& keep_in, const at::Tensor& cu_in,
                                  const at::Tensor& position_ids_in, const std::optional<at::Tensor>& fuse_into,
                                  std::optional<int64_t> out_capacity) {
  check_compact_args(hidden_in, keep_in, cu_in, position_ids_in, fuse_into, out_capacity);
  TORCH_CHECK_VALUE(hidden_in.size(0) < INT_MAX, "compact_tokens: hidden has too many rows for int32 offsets");
  const c10::cuda::CUDAGuard guard(hidden_in.device());
  const auto hidden = hidden_in.contiguous();
  const auto keep = keep_in.contiguous();
  const auto cu_seqlens = cu_in.contiguous();
  const auto position_ids = position_ids_in.contiguous();
  const bool fusing = fuse_into.has_value();
  const auto fuse = fusing ? fuse_into->contiguous() : at::Tensor();
  const int64_t rows = hidden.size(0), num_seq = cu_seqlens.size(0) - 1;
  const auto int_opts = cu_seqlens.options();
  const auto long_opts = int_opts.dtype(at::kLong);

  // Plan. Without out_capacity the buffers are sized for the worst case (every row kept) and narrowed afterwards.
  const int64_t capacity = out_capacity.value_or(rows);
  const auto keep_incl = at::cumsum(keep, 0, at::kInt);
  auto kept_index = at::empty({capacity}, long_opts);
  auto dest_row = at::empty({rows}, long_opts);
  auto fuse_count = at::zeros({fusing ? capacity : 0}, int_opts);
  auto fuse_key = at::empty({fusing ? rows : 0}, int_opts);
  auto new_cu = at::empty({num_seq + 1}, int_opts);
  auto summary = at::zeros({kSummaryWords}, int_opts);
  PlanArgs plan{keep.data_ptr<bool>(), keep_incl.data_ptr<int32_t>(), cu_seqlens.data_ptr<int32_t>(),
                fusing ? fuse.data_ptr<int64_t>() : nullptr, rows, num_seq, capacity, out_capacity.has_value(),
                kept_index.data_ptr<int64_t>(), dest_row.data_ptr<int64_t>(),
                fusing ? fuse_count.data_ptr<int32_t>() : nullptr, fusing ? fuse_key.data_ptr<int32_t>() : nullptr,
                new_cu.data_ptr<int32_t>(), summary.data_ptr<int32_t>()};
  const int64_t plan_threads = std::max(rows, num_seq + 1);
  plan_kernel<<<(plan_threads + kThreads - 1) / kThreads, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(plan);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  int64_t out_rows = capacity, max_seqlen = std::min(capacity, rows);
  if (!out_capacity.has_value()) {  // the one host sync: output size, longest sequence and error bits together
    const auto host = summary.cpu();
    const int32_t* h = host.data_ptr<int32_t>();
    raise_compact_errors(h[kErrors], capacity);
    out_rows = h[kKept];
    max_seqlen = h[kMaxSeqlen];
    kept_index = kept_index.narrow(0, 0, out_rows);
    if (fusing) fuse_count = fuse_count.narrow(0, 0, out_rows);
  }

  at::Tensor fuse_start, fuse_source;
  if (fusing) {  // stable sort by destination: each output row's sources, in increasing row order
    fuse_source = std::get<1>(at::sort(fuse_key, /*stable=*/true, /*dim=*/0, /*descending=*/false));
    fuse_start = at::cumsum(fuse_count, 0, at::kInt);
  }
  auto out = at::empty({out_rows, hidden.size(1)}, hidden.options());
  auto pos_out = at::empty({position_ids.size(0), out_rows}, position_ids.options());
  auto kept_index_out = at::empty({out_rows}, long_opts);
  if (out_rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "compact_tokens_cuda", [&] {
      gather<scalar_t>(hidden, position_ids, kept_index, summary, fuse_count, fuse_start, fuse_source, out, pos_out,
                       kept_index_out);
    });
  }
  return {out, pos_out, new_cu, kept_index_out, dest_row, fuse_count, c10::SymInt(max_seqlen)};
}

template <typename scalar_t>
__global__ void scatter_grad_kernel(const scalar_t* __restrict__ grad_out, const int64_t* __restrict__ dest,
                                    const int32_t* __restrict__ count, int64_t rows, int64_t out_rows, int64_t dim,
                                    scalar_t* __restrict__ grad) {
  const int lane = threadIdx.x % 32;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / 32; t < rows;
       t += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const int64_t r = dest[t];
    CUDA_KERNEL_ASSERT_MSG(r < out_rows, "compact_tokens_backward: dest_row is out of range for grad_out");
    scalar_t* g = grad + t * dim;
    if (r < 0) {  // discarded row
      for (int64_t d = lane; d < dim; d += 32) g[d] = scalar_t(0);
      continue;
    }
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t n = static_cast<acc_t>(count ? 1 + count[r] : 1);
    const scalar_t* src = grad_out + r * dim;
    for (int64_t d = lane; d < dim; d += 32) g[d] = static_cast<scalar_t>(static_cast<acc_t>(src[d]) / n);
  }
}

at::Tensor compact_tokens_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& dest_row_in,
                                        const at::Tensor& fuse_count_in) {
  check_compact_backward_args(grad_out_in, dest_row_in, fuse_count_in);
  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  const auto grad_out = grad_out_in.contiguous();
  const auto dest_row = dest_row_in.contiguous();
  const auto fuse_count = fuse_count_in.contiguous();
  const int64_t rows = dest_row.size(0), dim = grad_out.size(1);
  auto grad = at::empty({rows, dim}, grad_out.options());
  if (rows == 0 || dim == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "compact_tokens_backward_cuda", [&] {
    scatter_grad_kernel<scalar_t><<<gather_blocks(rows), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad_out.data_ptr<scalar_t>(), dest_row.data_ptr<int64_t>(),
        fuse_count.numel() ? fuse_count.data_ptr<int32_t>() : nullptr, rows, grad_out.size(0), dim,
        grad.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

}  // namespace
}  // namespace vitos

TORCH_LIBRARY_IMPL(vitos, CUDA, m) {
  m.impl("compact_tokens", &vitos::compact_tokens_cuda);
  m.impl("compact_tokens_backward", &vitos::compact_tokens_backward_cuda);
}
