// Hashed embedding-bag forward:
//   out[b, k] = sum_{j in bag b, indices[j] != padding_idx} a_j * sign(i_j, k) * w[idx(i_j, k)]
// with a_j = per_sample_weights[j] (or 1), divided by the bag's non-padding count in mean mode.
// Addresses are hashed in registers; nothing of size [rows, dim] is ever written besides out.
#include "bag_common.cuh"

namespace fastfair {
namespace cuda {
namespace {

template <typename T, typename I, int W>
__global__ void __launch_bounds__(kBlock)
    bag_forward_pooled_kernel(const T* __restrict__ weight, const I* __restrict__ indices,
                              const int64_t* __restrict__ offsets, const T* __restrict__ psw,
                              T* __restrict__ out, int64_t num_bags, Table t, Lanes L, bool mean,
                              int64_t padding_idx) {
  const int lane = threadIdx.x & 31;
  const int group = lane >> L.log2_group;
  const int sub = lane & (L.group - 1);
  for (int64_t bag = warp_id(); bag < num_bags; bag += warp_count()) {
    const int64_t start = offsets[bag];
    const int64_t end = offsets[bag + 1];
    const T count = bag_divisor<T>(indices, start, end, padding_idx, mean, lane);
    for (int tile = 0; tile < L.tiles; ++tile) {
      const int s = tile * L.group + sub;
      const bool active = s < L.slices;
      const Slice sl = slice_at(t, s * W);
      T acc[W];
#pragma unroll
      for (int v = 0; v < W; ++v) acc[v] = T(0);
      for (int64_t base = start; base < end; base += 32) {
        const Batch<T> b =
            load_batch(indices, psw, base, end, t, padding_idx, mean, count, lane, L.groups);
        for (int r = 0; r < b.steps; ++r) {
          const int src = r * L.groups + group;
          T coef;
          uint32_t addr_mix, sign_mix;
          fetch_row(b, t, src, coef, addr_mix, sign_mix);
          // Zeros instead of a skipped update: with the update inside the branch ptxas spills
          // the accumulators around the shuffles (CUDA 13, sm_80 / sm_90).
          T w[W];
          if (active && ((b.live >> src) & 1u)) {
            load_vec<W>(weight + slice_address(t, sl, addr_mix), w);
          } else {
#pragma unroll
            for (int v = 0; v < W; ++v) w[v] = T(0);
          }
          const uint32_t bits = slice_sign_bits(t, sl, sign_mix);
#pragma unroll
          for (int v = 0; v < W; ++v) acc[v] += (((bits >> v) & 1u) ? -coef : coef) * w[v];
        }
      }
      for (int off = L.group; off < 32; off <<= 1) {
#pragma unroll
        for (int v = 0; v < W; ++v) acc[v] += __shfl_xor_sync(kFullMask, acc[v], off);
      }
      if (group == 0 && active) store_vec<W>(out + bag * t.dim + static_cast<int64_t>(s) * W, acc);
    }
  }
}

// Every index its own bag: out[j, k] = a_j * sign(i_j, k) * w[idx(i_j, k)], zero for padding.
// Mean over a one-element bag is the element itself, so mode plays no part.
template <typename T, typename I, int W>
__global__ void __launch_bounds__(kBlock)
    embedding_forward_kernel(const T* __restrict__ weight, const I* __restrict__ indices,
                             const T* __restrict__ psw, T* __restrict__ out, int64_t num_indices,
                             Table t, Lanes L, int64_t padding_idx) {
  const int lane = threadIdx.x & 31;
  const int group = lane >> L.log2_group;
  const int sub = lane & (L.group - 1);
  const int64_t tasks = (num_indices + L.groups - 1) / L.groups;
  for (int64_t task = warp_id(); task < tasks; task += warp_count()) {
    const int64_t j = task * L.groups + group;
    if (j >= num_indices) continue;
    const int64_t row = static_cast<int64_t>(indices[j]);
    const bool live = row != padding_idx;
    const T coef = psw != nullptr ? psw[j] : T(1);
    const uint32_t addr_mix = row_mix(static_cast<uint32_t>(row), t.ka);
    const uint32_t sign_mix = t.is_signed ? row_mix(static_cast<uint32_t>(row), t.ks) : 0u;
    for (int s = sub; s < L.slices; s += L.group) {
      T val[W];
      if (live) {
        const Slice sl = slice_at(t, s * W);
        load_vec<W>(weight + slice_address(t, sl, addr_mix), val);
        const uint32_t bits = slice_sign_bits(t, sl, sign_mix);
#pragma unroll
        for (int v = 0; v < W; ++v) val[v] *= ((bits >> v) & 1u) ? -coef : coef;
      } else {
#pragma unroll
        for (int v = 0; v < W; ++v) val[v] = T(0);
      }
      store_vec<W>(out + j * t.dim + static_cast<int64_t>(s) * W, val);
    }
  }
}

template <typename T, typename I>
void launch_forward(uintptr_t weight, const BagSpec& bags, const Table& t, int64_t dim,
                    uintptr_t out, cudaStream_t stream) {
  const int width = vector_width<T>(dim, t.chunk, {weight, out});
  with_width<T>(width, [&](auto wc) {
    constexpr int W = decltype(wc)::value;
    const Lanes L = Lanes::make(dim, W);
    const auto* w = reinterpret_cast<const T*>(weight);
    const auto* idx = reinterpret_cast<const I*>(bags.indices);
    const auto* psw = reinterpret_cast<const T*>(bags.per_sample_weights);
    auto* o = reinterpret_cast<T*>(out);
    if (bags.offsets != 0) {
      const int grid = bag_grid(bags.num_bags, "bag_forward");
      bag_forward_pooled_kernel<T, I, W><<<grid, kBlock, 0, stream>>>(
          w, idx, reinterpret_cast<const int64_t*>(bags.offsets), psw, o, bags.num_bags, t, L,
          bags.mode == 1, bags.padding_idx);
    } else {
      const int grid = bag_grid((bags.num_indices + L.groups - 1) / L.groups, "bag_forward");
      embedding_forward_kernel<T, I, W><<<grid, kBlock, 0, stream>>>(
          w, idx, psw, o, bags.num_indices, t, L, bags.padding_idx);
    }
  });
  check_launch("bag_forward");
}

}  // namespace

void bag_forward(uintptr_t weight, int element_size, const BagSpec& bags, const TableSpec& spec,
                 uintptr_t out, uintptr_t stream) {
  const Table t = Table::make(spec);
  if (element_size != 4 && element_size != 8)
    throw std::invalid_argument("bag_forward: weight must be float32 or float64");
  if (bags.index_size != 4 && bags.index_size != 8)
    throw std::invalid_argument("bag_forward: indices must be int32 or int64");
  const int64_t rows = bags.offsets != 0 ? bags.num_bags : bags.num_indices;
  if (rows <= 0 || spec.dim == 0) return;
  const cudaStream_t s = as_stream(stream);
  if (element_size == 4) {
    if (bags.index_size == 4) launch_forward<float, int32_t>(weight, bags, t, spec.dim, out, s);
    else launch_forward<float, int64_t>(weight, bags, t, spec.dim, out, s);
  } else {
    if (bags.index_size == 4) launch_forward<double, int32_t>(weight, bags, t, spec.dim, out, s);
    else launch_forward<double, int64_t>(weight, bags, t, spec.dim, out, s);
  }
}

}  // namespace cuda
}  // namespace fastfair
