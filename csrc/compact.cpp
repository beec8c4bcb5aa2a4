// vitos::compact_tokens and vitos::compact_tokens_backward: schemas, argument checks and the CPU kernels.
//
// compact_tokens keeps the rows of a packed batch where `keep` is set, in order, gathers their original position
// ids, recomputes cu_seqlens, and optionally fuses dropped rows into kept rows (mean, summed in float32 in
// increasing source-row order (float64 for float64 input) so that every backend gives bitwise identical results). Besides the public outputs
// it returns the per-input-row destination and per-output-row fusion counts, from which the backward is one gather.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "vitos.h"

namespace vitos {

namespace {
constexpr const char* kOp = "compact_tokens";
}

void check_compact_args(const at::Tensor& hidden, const at::Tensor& keep, const at::Tensor& cu_seqlens,
                        const at::Tensor& position_ids, const std::optional<at::Tensor>& fuse_into,
                        std::optional<int64_t> out_capacity) {
  check_dim(hidden, 2, kOp, "hidden");
  TORCH_CHECK_VALUE(at::isFloatingType(hidden.scalar_type()), kOp, ": hidden must be a floating-point tensor, got ",
                    hidden.scalar_type());
  const int64_t rows = hidden.size(0);
  check_dtype(keep, at::kBool, kOp, "keep");
  check_dim(keep, 1, kOp, "keep");
  TORCH_CHECK_VALUE(keep.size(0) == rows, kOp, ": keep must have one entry per row of hidden (", rows, "), got ",
                    keep.size(0));
  check_dtype(cu_seqlens, at::kInt, kOp, "cu_seqlens");
  check_dim(cu_seqlens, 1, kOp, "cu_seqlens");
  TORCH_CHECK_VALUE(cu_seqlens.size(0) >= 1, kOp, ": cu_seqlens must have at least one entry (B + 1 offsets)");
  check_dtype(position_ids, at::kLong, kOp, "position_ids");
  check_dim(position_ids, 2, kOp, "position_ids");
  TORCH_CHECK_VALUE(position_ids.size(1) == rows, kOp, ": position_ids must have shape [P, ", rows, "], got ",
                    position_ids.sizes());
  check_same_device(keep, "keep", hidden, "hidden", kOp);
  check_same_device(cu_seqlens, "cu_seqlens", hidden, "hidden", kOp);
  check_same_device(position_ids, "position_ids", hidden, "hidden", kOp);
  if (fuse_into.has_value()) {
    check_dtype(*fuse_into, at::kLong, kOp, "fuse_into");
    check_dim(*fuse_into, 1, kOp, "fuse_into");
    TORCH_CHECK_VALUE(fuse_into->size(0) == rows, kOp, ": fuse_into must have one entry per row of hidden (", rows,
                      "), got ", fuse_into->size(0));
    check_same_device(*fuse_into, "fuse_into", hidden, "hidden", kOp);
  }
  TORCH_CHECK_VALUE(!out_capacity.has_value() || *out_capacity >= 0, kOp, ": out_capacity must be >= 0, got ",
                    out_capacity.value_or(0));
}

void raise_compact_errors(int32_t errors, int64_t out_capacity) {
  TORCH_CHECK_VALUE(!(errors & kCuSeqlensFirst), kOp, ": cu_seqlens[0] must be 0");
  TORCH_CHECK_VALUE(!(errors & kCuSeqlensOrder), kOp, ": cu_seqlens must be non-decreasing");
  TORCH_CHECK_VALUE(!(errors & kCuSeqlensLast), kOp, ": cu_seqlens[-1] must equal the number of rows of hidden");
  TORCH_CHECK_VALUE(!(errors & kFuseOutOfRange), kOp, ": fuse_into has a target outside [0, T) at a dropped row");
  TORCH_CHECK_VALUE(!(errors & kFuseNotKept), kOp, ": fuse_into targets a row that is not kept");
  TORCH_CHECK_VALUE(!(errors & kFuseOtherSequence), kOp, ": fuse_into targets a row of another sequence");
  TORCH_CHECK_VALUE(!(errors & kCapacityExceeded), kOp, ": more rows are kept than out_capacity=", out_capacity);
}

void check_compact_backward_args(const at::Tensor& grad_out, const at::Tensor& dest_row,
                                 const at::Tensor& fuse_count) {
  constexpr const char* op = "compact_tokens_backward";
  check_dim(grad_out, 2, op, "grad_out");
  check_dtype(dest_row, at::kLong, op, "dest_row");
  check_dim(dest_row, 1, op, "dest_row");
  check_dtype(fuse_count, at::kInt, op, "fuse_count");
  check_dim(fuse_count, 1, op, "fuse_count");
  TORCH_CHECK_VALUE(fuse_count.numel() == 0 || fuse_count.size(0) == grad_out.size(0), op,
                    ": fuse_count must be empty or have one entry per row of grad_out");
  check_same_device(dest_row, "dest_row", grad_out, "grad_out", op);
  check_same_device(fuse_count, "fuse_count", grad_out, "grad_out", op);
}

namespace {

using CompactResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, c10::SymInt>;

// Which output row each input row lands in, and the new sequence offsets.
struct Plan {
  std::vector<int64_t> kept_index;  // [T'] source row of each output row
  std::vector<int64_t> dest_row;    // [T] output row each input row contributes to, or -1
  std::vector<int32_t> new_cu;      // [B + 1]
  int64_t max_seqlen = 0;
};

Plan plan_compaction(const bool* keep, const int32_t* cu, int64_t rows, int64_t num_seq) {
  int32_t errors = 0;
  if (cu[0] != 0) errors |= kCuSeqlensFirst;
  for (int64_t b = 0; b < num_seq; ++b) {
    if (cu[b + 1] < cu[b]) errors |= kCuSeqlensOrder;
  }
  if (cu[num_seq] != rows) errors |= kCuSeqlensLast;
  raise_compact_errors(errors, 0);

  Plan plan;
  plan.dest_row.assign(rows, -1);
  plan.new_cu.assign(num_seq + 1, 0);
  for (int64_t b = 0; b < num_seq; ++b) {
    for (int64_t t = cu[b]; t < cu[b + 1]; ++t) {
      if (!keep[t]) continue;
      plan.dest_row[t] = static_cast<int64_t>(plan.kept_index.size());
      plan.kept_index.push_back(t);
    }
    plan.new_cu[b + 1] = static_cast<int32_t>(plan.kept_index.size());
    plan.max_seqlen = std::max<int64_t>(plan.max_seqlen, plan.new_cu[b + 1] - plan.new_cu[b]);
  }
  return plan;
}

// Fusion sources of each output row as CSR (offsets [T'+1], sources in increasing row order); also fills
// dest_row for the fused rows.
void plan_fusion(const int64_t* fuse, const bool* keep, const int32_t* cu, int64_t rows, int64_t num_seq,
                 Plan& plan, std::vector<int64_t>& offsets, std::vector<int64_t>& sources) {
  const int64_t kept = static_cast<int64_t>(plan.kept_index.size());
  std::vector<int64_t> count(kept, 0);
  for (int64_t j = 0; j < rows; ++j) {
    if (keep[j] || fuse[j] < 0) continue;
    const int64_t k = fuse[j];
    TORCH_CHECK_VALUE(k < rows, kOp, ": fuse_into[", j, "] = ", k, " is out of range for ", rows, " rows");
    TORCH_CHECK_VALUE(keep[k], kOp, ": fuse_into[", j, "] = ", k, " targets a row that is not kept");
    TORCH_CHECK_VALUE(sequence_of(cu, num_seq, j) == sequence_of(cu, num_seq, k), kOp, ": fuse_into[", j, "] = ", k,
                      " targets a row of another sequence");
    plan.dest_row[j] = plan.dest_row[k];
    ++count[plan.dest_row[k]];
  }
  offsets.assign(kept + 1, 0);
  for (int64_t r = 0; r < kept; ++r) offsets[r + 1] = offsets[r] + count[r];
  sources.assign(offsets[kept], 0);
  std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
  for (int64_t j = 0; j < rows; ++j) {  // increasing j: each row's sources come out sorted
    if (!keep[j] && fuse[j] >= 0) sources[fill[plan.dest_row[j]]++] = j;
  }
}

// float32 sums for 16/32-bit inputs, float64 for float64 inputs.
template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

template <typename scalar_t>
void fused_mean_rows(const scalar_t* x, scalar_t* out, int64_t dim, const std::vector<int64_t>& kept_index,
                     const std::vector<int64_t>& offsets, const std::vector<int64_t>& sources) {
  at::parallel_for(0, static_cast<int64_t>(kept_index.size()), 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t<scalar_t>> acc(dim);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = x + kept_index[r] * dim;
      for (int64_t d = 0; d < dim; ++d) acc[d] = static_cast<acc_t<scalar_t>>(row[d]);
      for (int64_t s = offsets[r]; s < offsets[r + 1]; ++s) {
        const scalar_t* src = x + sources[s] * dim;
        for (int64_t d = 0; d < dim; ++d) acc[d] += static_cast<acc_t<scalar_t>>(src[d]);
      }
      const auto n = static_cast<acc_t<scalar_t>>(1 + offsets[r + 1] - offsets[r]);
      for (int64_t d = 0; d < dim; ++d) out[r * dim + d] = static_cast<scalar_t>(acc[d] / n);
    }
  });
}

void copy_rows(const at::Tensor& x, at::Tensor& out, const std::vector<int64_t>& kept_index) {
  const int64_t row_bytes = x.size(1) * x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, static_cast<int64_t>(kept_index.size()), 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) std::memcpy(dst + r * row_bytes, src + kept_index[r] * row_bytes, row_bytes);
  });
}

at::Tensor from_vector(const std::vector<int64_t>& v, int64_t size, int64_t pad) {
  auto t = at::full({size}, pad, at::dtype(at::kLong));
  std::memcpy(t.data_ptr<int64_t>(), v.data(), v.size() * sizeof(int64_t));
  return t;
}

CompactResult compact_tokens_cpu(const at::Tensor& hidden_in, const at::Tensor& keep_in, const at::Tensor& cu_in,
                                 const at::Tensor& position_ids_in, const std::optional<at::Tensor>& fuse_into,
                                 std::optional<int64_t> out_capacity) {
  check_compact_args(hidden_in, keep_in, cu_in, position_ids_in, fuse_into, out_capacity);
  const auto hidden = hidden_in.contiguous();
  const auto keep = keep_in.contiguous();
  const auto cu_seqlens = cu_in.contiguous();
  const int64_t rows = hidden.size(0), dim = hidden.size(1), num_seq = cu_seqlens.size(0) - 1;
  const bool* keep_ptr = keep.data_ptr<bool>();
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();

  Plan plan = plan_compaction(keep_ptr, cu, rows, num_seq);
  const int64_t kept = static_cast<int64_t>(plan.kept_index.size());
  std::vector<int64_t> offsets, sources;
  if (fuse_into.has_value()) {
    const auto fuse = fuse_into->contiguous();
    plan_fusion(fuse.data_ptr<int64_t>(), keep_ptr, cu, rows, num_seq, plan, offsets, sources);
  }
  const int64_t out_rows = out_capacity.value_or(kept);
  raise_compact_errors(kept > out_rows ? kCapacityExceeded : 0, out_rows);

  auto out = at::empty({out_rows, dim}, hidden.options());
  out.narrow(0, kept, out_rows - kept).zero_();  // padding rows of the out_capacity form
  if (fuse_into.has_value()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "compact_tokens_cpu", [&] {
      fused_mean_rows<scalar_t>(hidden.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), dim, plan.kept_index, offsets,
                                sources);
    });
  } else {
    copy_rows(hidden, out, plan.kept_index);
  }

  auto kept_index = from_vector(plan.kept_index, out_rows, -1);
  auto position_ids = at::zeros({position_ids_in.size(0), out_rows}, position_ids_in.options());
  position_ids.narrow(1, 0, kept).copy_(position_ids_in.index_select(1, kept_index.narrow(0, 0, kept)));
  auto new_cu = at::empty({num_seq + 1}, cu_seqlens.options());
  std::memcpy(new_cu.data_ptr<int32_t>(), plan.new_cu.data(), (num_seq + 1) * sizeof(int32_t));
  auto dest_row = from_vector(plan.dest_row, rows, -1);
  auto fuse_count = at::zeros({fuse_into.has_value() ? out_rows : 0}, cu_seqlens.options());
  for (int64_t r = 0; r < static_cast<int64_t>(offsets.size()) - 1; ++r) {
    fuse_count.data_ptr<int32_t>()[r] = static_cast<int32_t>(offsets[r + 1] - offsets[r]);
  }
  // Without a sync-free capacity the exact maximum is reported; with one, an upper bound that needs no data.
  const int64_t max_seqlen = out_capacity.has_value() ? std::min(out_rows, rows) : plan.max_seqlen;
  return {out, position_ids, new_cu, kept_index, dest_row, fuse_count, c10::SymInt(max_seqlen)};
}

template <typename scalar_t>
void scatter_grad(const scalar_t* g, scalar_t* out, const int64_t* dest, const int32_t* count, int64_t rows,
                  int64_t dim) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = dest[t];
      if (r < 0) continue;  // discarded row: zero gradient (out is zero-initialised)
      const auto n = static_cast<acc_t<scalar_t>>(count ? 1 + count[r] : 1);
      for (int64_t d = 0; d < dim; ++d) {
        out[t * dim + d] = static_cast<scalar_t>(static_cast<acc_t<scalar_t>>(g[r * dim + d]) / n);
      }
    }
  });
}

at::Tensor compact_tokens_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& dest_row_in,
                                       const at::Tensor& fuse_count_in) {
  check_compact_backward_args(grad_out_in, dest_row_in, fuse_count_in);
  const auto grad_out = grad_out_in.contiguous();
  const auto dest_row = dest_row_in.contiguous();
  const auto fuse_count = fuse_count_in.contiguous();
  const int64_t rows = dest_row.size(0), dim = grad_out.size(1), out_rows = grad_out.size(0);
  const int64_t* dest = dest_row.data_ptr<int64_t>();
  for (int64_t t = 0; t < rows; ++t) {
    TORCH_CHECK_VALUE(dest[t] < out_rows, "compact_tokens_backward: dest_row[", t, "] = ", dest[t],
                      " is out of range for grad_out with ", out_rows, " rows");
  }
  auto grad = at::zeros({rows, dim}, grad_out.options());
  const int32_t* count = fuse_count.numel() ? fuse_count.data_ptr<int32_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "compact_tokens_backward_cpu", [&] {
    scatter_grad<scalar_t>(grad_out.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), dest, count, rows, dim);
  });
  return grad;
}

}  // namespace
}  // namespace vitos

TORCH_LIBRARY_FRAGMENT(vitos, m) {
  m.def(
      "compact_tokens(Tensor hidden, Tensor keep, Tensor cu_seqlens, Tensor position_ids, Tensor? fuse_into=None, "
      "SymInt? out_capacity=None) -> (Tensor hidden, Tensor position_ids, Tensor cu_seqlens, Tensor kept_index, "
      "Tensor dest_row, Tensor fuse_count, SymInt max_seqlen)");
  m.def("compact_tokens_backward(Tensor grad_out, Tensor dest_row, Tensor fuse_count) -> Tensor");
}

TORCH_LIBRARY_IMPL(vitos, CPU, m) {
  m.impl("compact_tokens", &vitos::compact_tokens_cpu);
  m.impl("compact_tokens_backward", &vitos::compact_tokens_backward_cpu);
}
