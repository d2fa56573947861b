// Deterministic hashed embedding-bag backward (chosen under torch.use_deterministic_algorithms):
//   grad_w[Z r + l] = sum_{(j, c) : slot(i_j, c) = r, c Z + l < dim} a_j sign(i_j, c Z + l)
//                     * grad_out[bag(j), c Z + l]
// with the same a_j as bag_backward.cu, but every slot summed by one warp in a fixed order, so the
// result is bit-identical from run to run (the atomic path's float rounding depends on which
// atomic lands first).
//
// 1. slot_keys: one key per (element j, chunk c), key[j C + c] = r = addr_hash(i_j, c) mod (m / Z),
//    or m / Z ("dead") for padding rows and elements outside every bag; value = j C + c. So the
//    keys are N C words, never N dim (and never the dense gradient's size).
// 2. A stable radix sort of (key, value) pairs on the low bit_length(m / Z) bits (CUB).
// 3. segment_sum: a warp scans 32 sorted keys, finds the segment starts (key differs from its
//    predecessor) and, per start, walks that slot's run of entries; lanes take the chunk's columns,
//    groups of lanes take successive entries, and the groups are combined with a fixed xor tree.
//    Only hit slots are written; grad_w was zeroed first.
// Pooled bags first get a per-element pass (one warp per bag) that stores bag(j) (-1: dead) and
// a_j, so steps 1 and 3 run per entry without searching offsets.
#include <cub/device/device_radix_sort.cuh>

#include "bag_common.cuh"

namespace fastfair {
namespace cuda {
namespace {

// The workspace, carved from one caller-allocated buffer (torch's allocator, stream-ordered):
// two key and two value buffers for the sort, per-element bag and coefficient, CUB's scratch.
struct Layout {
  int64_t entries;  // N C
  int64_t chunks;   // C = ceil(dim / Z)
  uint64_t dead;    // m / Z, the key of entries that add nothing (sorted last)
  int bits;         // key bits the sort compares
  bool wide;        // 64-bit keys and values
  size_t keys[2], values[2], bag, coef, scratch, scratch_bytes, total;
};

constexpr size_t kAlign = 256;

inline size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

inline int key_bits(uint64_t dead) {
  int b = 1;
  while (b < 64 && (dead >> b) != 0) ++b;
  return b;
}

template <typename K>
size_t sort_scratch_bytes(int64_t entries, int bits) {
  size_t bytes = 0;
  cub::DoubleBuffer<K> k(nullptr, nullptr);
  cub::DoubleBuffer<K> v(nullptr, nullptr);
  check_cuda(cub::DeviceRadixSort::SortPairs(nullptr, bytes, k, v, entries, 0, bits),
             "bag_backward_deterministic");
  return bytes;
}

Layout make_layout(int64_t num_indices, bool pooled, const TableSpec& spec, int element_size) {
  Layout l;
  l.chunks = spec.dim > 0 ? (spec.dim + spec.chunk_size - 1) / spec.chunk_size : 0;
  l.entries = num_indices * l.chunks;
  l.dead = static_cast<uint64_t>(spec.memory_size / spec.chunk_size);
  l.bits = key_bits(l.dead);
  // The dead key m / Z and the largest value N C - 1 must both fit the key / value word.
  l.wide = l.dead > UINT32_MAX || static_cast<uint64_t>(l.entries) > UINT32_MAX;
  const size_t word = l.wide ? 8 : 4;
  l.scratch_bytes = l.wide ? sort_scratch_bytes<uint64_t>(l.entries, l.bits)
                           : sort_scratch_bytes<uint32_t>(l.entries, l.bits);
  size_t at = 0;
  for (int b = 0; b < 2; ++b) {
    l.keys[b] = at;
    at += align_up(l.entries * word);
    l.values[b] = at;
    at += align_up(l.entries * word);
  }
  l.bag = at;
  if (pooled) at += align_up(num_indices * sizeof(int64_t));
  l.coef = at;
  if (pooled) at += align_up(num_indices * static_cast<size_t>(element_size));
  l.scratch = at;
  l.total = at + align_up(l.scratch_bytes);
  return l;
}

// Pooled bags: bag_of[j] = b and coef[j] = a_j (per-sample weight over the mean's count) for the
// elements of bag b; the last bag's warp also marks the elements after it dead (bag_of = -1).
template <typename T, typename I>
__global__ void __launch_bounds__(kBlock)
    element_bags_kernel(const I* __restrict__ indices, const int64_t* __restrict__ offsets,
                        const T* __restrict__ psw, int64_t num_indices, int64_t num_bags,
                        bool mean, int64_t padding_idx, int64_t* __restrict__ bag_of,
                        T* __restrict__ coef) {
  const int lane = threadIdx.x & 31;
  for (int64_t bag = warp_id(); bag < num_bags; bag += warp_count()) {
    const int64_t start = offsets[bag];
    const int64_t end = offsets[bag + 1];
    const T count = bag_divisor<T>(indices, start, end, padding_idx, mean, lane);
    for (int64_t j = start + lane; j < end; j += 32) {
      bag_of[j] = bag;
      coef[j] = (psw != nullptr ? psw[j] : T(1)) / count;
    }
    if (bag == num_bags - 1) {
      for (int64_t j = end + lane; j < num_indices; j += 32) bag_of[j] = -1;
    }
  }
}

// key[q] = slot of (i_j, c) or `dead`, value[q] = q, for q = j C + c.
template <typename I, typename K>
__global__ void __launch_bounds__(kBlock)
    slot_keys_kernel(const I* __restrict__ indices, const int64_t* __restrict__ bag_of,
                     int64_t entries, int64_t chunks, Table t, int64_t padding_idx, K dead,
                     K* __restrict__ keys, K* __restrict__ values) {
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < entries;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = q / chunks;
    const int64_t row = static_cast<int64_t>(indices[j]);
    const bool live = row != padding_idx && (bag_of == nullptr || bag_of[j] >= 0);
    const uint32_t c = static_cast<uint32_t>(q - j * chunks);
    const uint32_t mixed = row_mix(static_cast<uint32_t>(row), t.ka);
    keys[q] = live ? static_cast<K>(t.slots.mod(chunk_mix(mixed, c))) : dead;
    values[q] = static_cast<K>(q);
  }
}

// Sums the run of sorted entries with key `seg` that starts at p0 into grad_w[Z seg + k], k <
// min(Z, dim). All 32 lanes call it together. Lane `sub` of group `group` owns column k = tile P +
// sub; entry r G + group of each batch of 32 goes to group `group`; the groups' partial sums are
// combined by a fixed xor tree, so the order of additions never depends on timing.
template <typename T, typename I, typename K>
__device__ void sum_segment(int64_t p0, K seg, const K* __restrict__ keys,
                            const K* __restrict__ values, int64_t entries,
                            const T* __restrict__ grad_out, const I* __restrict__ indices,
                            const int64_t* __restrict__ bag_of, const T* __restrict__ coef,
                            T* __restrict__ grad_w, const Table& t, int64_t chunks, int32_t width,
                            const Lanes& L, int lane) {
  const int group = lane >> L.log2_group;
  const int sub = lane & (L.group - 1);
  for (int tile = 0; tile < L.tiles; ++tile) {
    const int32_t k = tile * L.group + sub;
    const bool active = k < width;
    T acc = T(0);
    for (int64_t base = p0;; base += 32) {
      const int64_t q = base + lane;
      const bool mine = q < entries && keys[q] == seg;
      // Sorted keys: the run's entries in this batch are a prefix of the lanes.
      const int here = __popc(__ballot_sync(kFullMask, mine));
      int64_t g_at = 0;
      int64_t col0 = 0;
      T a = T(0);
      uint32_t sign_mix = 0;
      if (mine) {
        const int64_t e = static_cast<int64_t>(values[q]);
        const int64_t j = e / chunks;
        const int64_t b = bag_of != nullptr ? bag_of[j] : j;
        col0 = (e - j * chunks) * t.chunk;
        g_at = b * t.dim + col0;
        a = coef != nullptr ? coef[j] : T(1);
        if (t.is_signed) {
          sign_mix = row_mix(static_cast<uint32_t>(static_cast<int64_t>(indices[j])), t.ks);
        }
      }
      for (int r = 0; r * L.groups < here; ++r) {
        const int src = r * L.groups + group;
        const int64_t at = __shfl_sync(kFullMask, g_at, src);
        const int64_t c0 = __shfl_sync(kFullMask, col0, src);
        const T coef_src = __shfl_sync(kFullMask, a, src);
        const uint32_t mix = __shfl_sync(kFullMask, sign_mix, src);
        const int64_t col = c0 + k;
        if (active && src < here && col < t.dim) {
          const uint32_t word =
              t.is_signed ? fmix32(mix + static_cast<uint32_t>(col >> 5) * kGolden) : 0u;
          const T g = __ldg(grad_out + at + k);
          acc += (((word >> (col & 31)) & 1u) ? -coef_src : coef_src) * g;
        }
      }
      if (here < 32) break;
    }
    for (int off = L.group; off < 32; off <<= 1) acc += __shfl_xor_sync(kFullMask, acc, off);
    if (group == 0 && active) grad_w[t.chunk * static_cast<int64_t>(seg) + k] = acc;
  }
}

template <typename T, typename I, typename K>
__global__ void __launch_bounds__(kBlock)
    segment_sum_kernel(const K* __restrict__ keys, const K* __restrict__ values, int64_t entries,
                       K dead, const T* __restrict__ grad_out, const I* __restrict__ indices,
                       const int64_t* __restrict__ bag_of, const T* __restrict__ coef,
                       T* __restrict__ grad_w, Table t, int64_t chunks, int32_t width, Lanes L) {
  const int lane = threadIdx.x & 31;
  for (int64_t base = warp_id() * 32; base < entries; base += warp_count() * 32) {
    const int64_t p = base + lane;
    const K key = p < entries ? keys[p] : dead;
    const bool start = key != dead && (p == 0 || keys[p - 1] != key);
    for (unsigned starts = __ballot_sync(kFullMask, start); starts != 0; starts &= starts - 1) {
      const int src = __ffs(starts) - 1;
      sum_segment<T, I, K>(base + src, __shfl_sync(kFullMask, key, src), keys, values, entries,
                           grad_out, indices, bag_of, coef, grad_w, t, chunks, width, L, lane);
    }
  }
}

template <typename T, typename I, typename K>
void run_sorted(uintptr_t grad_out, const BagSpec& bags, const Table& t, const Layout& l,
                uintptr_t grad_w, uintptr_t workspace, cudaStream_t stream) {
  auto* ws = reinterpret_cast<unsigned char*>(workspace);
  const auto* idx = reinterpret_cast<const I*>(bags.indices);
  const auto* psw = reinterpret_cast<const T*>(bags.per_sample_weights);
  const int64_t* bag_of = nullptr;
  const T* coef = psw;
  if (bags.offsets != 0) {
    auto* b = reinterpret_cast<int64_t*>(ws + l.bag);
    auto* c = reinterpret_cast<T*>(ws + l.coef);
    element_bags_kernel<T, I><<<bag_grid(bags.num_bags, "bag_backward_deterministic"), kBlock, 0,
                                stream>>>(idx, reinterpret_cast<const int64_t*>(bags.offsets), psw,
                                          bags.num_indices, bags.num_bags, bags.mode == 1,
                                          bags.padding_idx, b, c);
    bag_of = b;
    coef = c;
  }
  const K dead = static_cast<K>(l.dead);
  cub::DoubleBuffer<K> keys(reinterpret_cast<K*>(ws + l.keys[0]),
                            reinterpret_cast<K*>(ws + l.keys[1]));
  cub::DoubleBuffer<K> values(reinterpret_cast<K*>(ws + l.values[0]),
                              reinterpret_cast<K*>(ws + l.values[1]));
  slot_keys_kernel<I, K><<<grid_for(l.entries, "bag_backward_deterministic"), kBlock, 0, stream>>>(
      idx, bag_of, l.entries, l.chunks, t, bags.padding_idx, dead, keys.Current(),
      values.Current());
  check_launch("bag_backward_deterministic");
  size_t scratch = l.scratch_bytes;
  check_cuda(cub::DeviceRadixSort::SortPairs(ws + l.scratch, scratch, keys, values, l.entries, 0,
                                             l.bits, stream),
             "bag_backward_deterministic");
  const int32_t width = static_cast<int32_t>(t.chunk < t.dim ? t.chunk : t.dim);
  const Lanes L = Lanes::make(width, 1);
  segment_sum_kernel<T, I, K><<<grid_for(l.entries, "bag_backward_deterministic"), kBlock, 0,
                                stream>>>(keys.Current(), values.Current(), l.entries, dead,
                                          reinterpret_cast<const T*>(grad_out), idx, bag_of, coef,
                                          reinterpret_cast<T*>(grad_w), t, l.chunks, width, L);
  check_launch("bag_backward_deterministic");
}

template <typename T, typename I>
void dispatch_keys(uintptr_t grad_out, const BagSpec& bags, const Table& t, const Layout& l,
                    uintptr_t grad_w, uintptr_t workspace, cudaStream_t stream) {
  if (l.wide) run_sorted<T, I, uint64_t>(grad_out, bags, t, l, grad_w, workspace, stream);
  else run_sorted<T, I, uint32_t>(grad_out, bags, t, l, grad_w, workspace, stream);
}

void check_sizes(int element_size, int64_t num_indices) {
  if (element_size != 4 && element_size != 8)
    throw std::invalid_argument("bag_backward_deterministic: grad_out must be float32 or float64");
  if (num_indices < 0)
    throw std::invalid_argument("bag_backward_deterministic: num_indices must be >= 0");
}

}  // namespace

size_t bag_backward_deterministic_workspace(int element_size, int64_t num_indices, bool pooled,
                                            const TableSpec& spec) {
  check_table(spec);
  check_sizes(element_size, num_indices);
  return make_layout(num_indices, pooled, spec, element_size).total;
}

void bag_backward_deterministic(uintptr_t grad_out, int element_size, const BagSpec& bags,
                                const TableSpec& spec, uintptr_t grad_w, uintptr_t ws,
                                size_t workspace_bytes, uintptr_t stream) {
  const Table t = Table::make(spec);
  check_sizes(element_size, bags.num_indices);
  if (bags.index_size != 4 && bags.index_size != 8)
    throw std::invalid_argument("bag_backward_deterministic: indices must be int32 or int64");
  const Layout l = make_layout(bags.num_indices, bags.offsets != 0, spec, element_size);
  if (workspace_bytes < l.total)
    throw std::invalid_argument("bag_backward_deterministic: workspace of " +
                                std::to_string(workspace_bytes) + " bytes, needs " +
                                std::to_string(l.total));
  const cudaStream_t s = as_stream(stream);
  check_cuda(cudaMemsetAsync(reinterpret_cast<void*>(grad_w), 0,
                             static_cast<size_t>(spec.memory_size) * element_size, s),
             "bag_backward_deterministic");
  const int64_t rows = bags.offsets != 0 ? bags.num_bags : bags.num_indices;
  if (rows <= 0 || l.entries == 0) return;
  if (element_size == 4) {
    if (bags.index_size == 4) dispatch_keys<float, int32_t>(grad_out, bags, t, l, grad_w, ws, s);
    else dispatch_keys<float, int64_t>(grad_out, bags, t, l, grad_w, ws, s);
  } else {
    if (bags.index_size == 4) dispatch_keys<double, int32_t>(grad_out, bags, t, l, grad_w, ws, s);
    else dispatch_keys<double, int64_t>(grad_out, bags, t, l, grad_w, ws, s);
  }
}

}  // namespace cuda
}  // namespace fastfair
