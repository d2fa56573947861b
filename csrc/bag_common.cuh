// Warp layout shared by the hashed embedding-bag forward and backward kernels.
//
// A lane owns W contiguous columns (a "slice", see vector_width), so it computes one address hash
// per (row, slice) and moves W values in aligned vector pieces. A warp splits into G groups of
// P = 32 / G lanes, P the smallest power of two >= dim / W (at most 32): when rows are narrow, the
// G groups work on G different rows at once instead of leaving lanes idle. Rows wider than 32
// slices are covered in `tiles` passes of 32 slices.
//
// Pooled bags: one warp per bag. The warp reads the bag's indices 32 at a time (one per lane,
// coalesced), hashes each row once (the per-row half of the address and sign hashes) and
// broadcasts it with shuffles; group g takes the batch's lanes g, g + G, g + 2G, ... Groups of a
// bag are summed with xor-shuffles at the end (forward). Un-pooled lookups: one row per group.
#pragma once

#include "cuda_common.cuh"

namespace fastfair {
namespace cuda {

struct Lanes {
  int32_t slices;  // S = dim / W
  int32_t group;   // P, lanes per group
  int32_t log2_group;
  int32_t groups;  // G = 32 / P
  int32_t tiles;   // ceil(S / P)

  static Lanes make(int64_t dim, int w) {
    Lanes l;
    l.slices = static_cast<int32_t>(dim / w);
    l.log2_group = 0;
    while ((1 << l.log2_group) < l.slices && l.log2_group < 5) ++l.log2_group;
    l.group = 1 << l.log2_group;
    l.groups = 32 / l.group;
    l.tiles = (l.slices + l.group - 1) / l.group;
    return l;
  }
};

// Global warp id and warp count for warp-granular grid-stride loops.
__device__ __forceinline__ int64_t warp_id() {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
}
__device__ __forceinline__ int64_t warp_count() {
  return (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
}

// Rows of bag [start, end) that are not padding; warp-uniform result.
template <typename I>
__device__ __forceinline__ int64_t bag_count(const I* __restrict__ indices, int64_t start,
                                             int64_t end, int64_t padding_idx, int lane) {
  if (padding_idx < 0) return end > start ? end - start : 0;
  int64_t n = 0;
  for (int64_t base = start; base < end; base += 32) {
    const int64_t j = base + lane;
    const bool keep = j < end && static_cast<int64_t>(indices[j]) != padding_idx;
    n += __popc(__ballot_sync(kFullMask, keep));
  }
  return n;
}

// What mode's pooling divides a bag's sum by: its non-padding row count (at least 1) in mean
// mode, 1 in sum mode; warp-uniform.
template <typename T, typename I>
__device__ __forceinline__ T bag_divisor(const I* __restrict__ indices, int64_t start,
                                         int64_t end, int64_t padding_idx, bool mean, int lane) {
  if (!mean) return T(1);
  const int64_t n = bag_count(indices, start, end, padding_idx, lane);
  return static_cast<T>(n > 1 ? n : 1);
}

// One lane's share of a batch of up to 32 consecutive bag elements: its element's coefficient
// a_j (per-sample weight, divided by the bag count in mean mode) and its row's hash halves; plus
// the warp-uniform mask of live (in-bag, non-padding) lanes and the shuffle steps per group.
template <typename T>
struct Batch {
  T coef;
  uint32_t addr_mix;
  uint32_t sign_mix;
  unsigned live;
  int steps;
};

template <typename T, typename I>
__device__ __forceinline__ Batch<T> load_batch(const I* __restrict__ indices,
                                               const T* __restrict__ psw, int64_t base,
                                               int64_t end, const Table& t, int64_t padding_idx,
                                               bool mean, T count, int lane, int groups) {
  Batch<T> b;
  b.coef = T(0);
  b.addr_mix = 0;
  b.sign_mix = 0;
  const int64_t j = base + lane;
  bool live = j < end;
  if (live) {
    const int64_t row = static_cast<int64_t>(indices[j]);
    live = row != padding_idx;
    b.coef = psw != nullptr ? psw[j] : T(1);
    if (mean) b.coef /= count;
    b.addr_mix = row_mix(static_cast<uint32_t>(row), t.ka);
    if (t.is_signed) b.sign_mix = row_mix(static_cast<uint32_t>(row), t.ks);
  }
  b.live = __ballot_sync(kFullMask, live);
  const int64_t left = end - base;
  const int here = left < 32 ? static_cast<int>(left) : 32;
  b.steps = (here + groups - 1) / groups;
  return b;
}

// Row `src` of the batch, broadcast to every lane (all 32 lanes must call it together).
template <typename T>
__device__ __forceinline__ void fetch_row(const Batch<T>& b, const Table& t, int src, T& coef,
                                          uint32_t& addr_mix, uint32_t& sign_mix) {
  coef = __shfl_sync(kFullMask, b.coef, src);
  addr_mix = __shfl_sync(kFullMask, b.addr_mix, src);
  sign_mix = t.is_signed ? __shfl_sync(kFullMask, b.sign_mix, src) : 0u;
}

// Host side: the launch shape of a bag kernel with `tasks` warp tasks.
inline int bag_grid(int64_t tasks, const char* op) { return grid_for(tasks * 32, op); }

}  // namespace cuda
}  // namespace fastfair
