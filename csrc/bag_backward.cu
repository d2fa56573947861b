// Hashed embedding-bag backward into the dense 1-D gradient of the memory array:
//   grad_w[s] = sum_{(j, k) : idx(i_j, k) = s} a_j * sign(i_j, k) * grad_out[bag(j), k]
// with a_j as in the forward. Scattered with atomics (float, or double on sm_60+): hashing many
// virtual elements onto few slots is the point of the table, so collisions are expected.
#include "bag_common.cuh"

namespace fastfair {
namespace cuda {
namespace {

// A pooled bag's gradient row is the same for all its elements: each lane loads its slice once
// per bag and scatters it, scaled and signed, for every element.
template <typename T, typename I, int W>
__global__ void __launch_bounds__(kBlock)
    bag_backward_pooled_kernel(const T* __restrict__ grad_out, const I* __restrict__ indices,
                               const int64_t* __restrict__ offsets, const T* __restrict__ psw,
                               T* __restrict__ grad_w, int64_t num_bags, Table t, Lanes L,
                               bool mean, int64_t padding_idx) {
  const int lane = threadIdx.x & 31;
  const int group = lane >> L.log2_group;
  const int sub = lane & (L.group - 1);
  for (int64_t bag = warp_id(); bag < num_bags; bag += warp_count()) {
    const int64_t start = offsets[bag];
    const int64_t end = offsets[bag + 1];
    if (end <= start) continue;
    const T count = bag_divisor<T>(indices, start, end, padding_idx, mean, lane);
    for (int tile = 0; tile < L.tiles; ++tile) {
      const int s = tile * L.group + sub;
      const bool active = s < L.slices;
      const Slice sl = slice_at(t, s * W);
      T g[W];
      if (active) {
        load_vec<W>(grad_out + bag * t.dim + static_cast<int64_t>(s) * W, g);
      } else {
#pragma unroll
        for (int v = 0; v < W; ++v) g[v] = T(0);
      }
      for (int64_t base = start; base < end; base += 32) {
        const Batch<T> b =
            load_batch(indices, psw, base, end, t, padding_idx, mean, count, lane, L.groups);
        for (int r = 0; r < b.steps; ++r) {
          const int src = r * L.groups + group;
          T coef;
          uint32_t addr_mix, sign_mix;
          fetch_row(b, t, src, coef, addr_mix, sign_mix);
          if (active && ((b.live >> src) & 1u)) {
            const uint32_t bits = slice_sign_bits(t, sl, sign_mix);
            T val[W];
#pragma unroll
            for (int v = 0; v < W; ++v) val[v] = (((bits >> v) & 1u) ? -coef : coef) * g[v];
            atomic_add_vec<W>(grad_w + slice_address(t, sl, addr_mix), val);
          }
        }
      }
    }
  }
}

template <typename T, typename I, int W>
__global__ void __launch_bounds__(kBlock)
    embedding_backward_kernel(const T* __restrict__ grad_out, const I* __restrict__ indices,
                              const T* __restrict__ psw, T* __restrict__ grad_w,
                              int64_t num_indices, Table t, Lanes L, int64_t padding_idx) {
  const int lane = threadIdx.x & 31;
  const int group = lane >> L.log2_group;
  const int sub = lane & (L.group - 1);
  const int64_t tasks = (num_indices + L.groups - 1) / L.groups;
  for (int64_t task = warp_id(); task < tasks; task += warp_count()) {
    const int64_t j = task * L.groups + group;
    if (j >= num_indices) continue;
    const int64_t row = static_cast<int64_t>(indices[j]);
    if (row == padding_idx) continue;
    const T coef = psw != nullptr ? psw[j] : T(1);
    const uint32_t addr_mix = row_mix(static_cast<uint32_t>(row), t.ka);
    const uint32_t sign_mix = t.is_signed ? row_mix(static_cast<uint32_t>(row), t.ks) : 0u;
    for (int s = sub; s < L.slices; s += L.group) {
      const Slice sl = slice_at(t, s * W);
      T val[W];
      load_vec<W>(grad_out + j * t.dim + static_cast<int64_t>(s) * W, val);
      const uint32_t bits = slice_sign_bits(t, sl, sign_mix);
#pragma unroll
      for (int v = 0; v < W; ++v) val[v] *= ((bits >> v) & 1u) ? -coef : coef;
      atomic_add_vec<W>(grad_w + slice_address(t, sl, addr_mix), val);
    }
  }
}

template <typename T, typename I>
void launch_backward(uintptr_t grad_out, const BagSpec& bags, const Table& t, int64_t dim,
                     uintptr_t grad_w, cudaStream_t stream) {
  const int width = vector_width<T>(dim, t.chunk, {grad_out, grad_w});
  with_width<T>(width, [&](auto wc) {
    constexpr int W = decltype(wc)::value;
    const Lanes L = Lanes::make(dim, W);
    const auto* g = reinterpret_cast<const T*>(grad_out);
    const auto* idx = reinterpret_cast<const I*>(bags.indices);
    const auto* psw = reinterpret_cast<const T*>(bags.per_sample_weights);
    auto* gw = reinterpret_cast<T*>(grad_w);
    if (bags.offsets != 0) {
      const int grid = bag_grid(bags.num_bags, "bag_backward");
      bag_backward_pooled_kernel<T, I, W><<<grid, kBlock, 0, stream>>>(
          g, idx, reinterpret_cast<const int64_t*>(bags.offsets), psw, gw, bags.num_bags, t, L,
          bags.mode == 1, bags.padding_idx);
    } else {
      const int grid = bag_grid((bags.num_indices + L.groups - 1) / L.groups, "bag_backward");
      embedding_backward_kernel<T, I, W><<<grid, kBlock, 0, stream>>>(
          g, idx, psw, gw, bags.num_indices, t, L, bags.padding_idx);
    }
  });
  check_launch("bag_backward");
}

}  // namespace

void bag_backward(uintptr_t grad_out, int element_size, const BagSpec& bags,
                  const TableSpec& spec, uintptr_t grad_w, uintptr_t stream) {
  const Table t = Table::make(spec);
  if (element_size != 4 && element_size != 8)
    throw std::invalid_argument("bag_backward: grad_out must be float32 or float64");
  if (bags.index_size != 4 && bags.index_size != 8)
    throw std::invalid_argument("bag_backward: indices must be int32 or int64");
  const cudaStream_t s = as_stream(stream);
  check_cuda(cudaMemsetAsync(reinterpret_cast<void*>(grad_w), 0,
                             static_cast<size_t>(spec.memory_size) * element_size, s),
             "bag_backward");
  const int64_t rows = bags.offsets != 0 ? bags.num_bags : bags.num_indices;
  if (rows <= 0 || bags.num_indices == 0 || spec.dim == 0) return;
  const int64_t dim = spec.dim;
  if (element_size == 4) {
    if (bags.index_size == 4) launch_backward<float, int32_t>(grad_out, bags, t, dim, grad_w, s);
    else launch_backward<float, int64_t>(grad_out, bags, t, dim, grad_w, s);
  } else {
    if (bags.index_size == 4) launch_backward<double, int32_t>(grad_out, bags, t, dim, grad_w, s);
    else launch_backward<double, int64_t>(grad_out, bags, t, dim, grad_w, s);
  }
}

}  // namespace cuda
}  // namespace fastfair
