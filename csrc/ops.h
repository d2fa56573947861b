// Host-side entry points of the CUDA kernels. Plain C++ types only, so bindings.cpp compiles with
// the host compiler and never sees a CUDA header. Pointers are device addresses and the stream is a
// cudaStream_t, both carried as integers; the Python wrapper (fastfair/kernels/cuda_backend.py)
// checks dtypes, devices and contiguity and makes the tensors' device current before calling.
// Every launcher throws std::invalid_argument on bad sizes (Python ValueError) and
// std::runtime_error with the CUDA error string when a launch fails (Python RuntimeError).
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>

namespace fastfair {

// The hash-side description of one virtual table: n x dim virtual elements in memory_size slots.
struct TableSpec {
  int64_t dim;
  int64_t memory_size;
  int64_t chunk_size;
  uint32_t ka;
  uint32_t ks;
  bool is_signed;
};

// Bag layout. offsets == 0: every index is its own bag (num_bags is then num_indices);
// otherwise an int64 array of num_bags + 1 entries. per_sample_weights == 0: all ones.
struct BagSpec {
  uintptr_t indices;
  int index_size;  // 4 (int32) or 8 (int64)
  int64_t num_indices;
  uintptr_t offsets;
  int64_t num_bags;
  uintptr_t per_sample_weights;
  int mode;  // 0 sum, 1 mean
  int64_t padding_idx;  // -1: none
};

// Addresses are Z * (32-bit hash mod (m / Z)) + k mod Z, so Z must divide m and m / Z <= 2^32;
// columns (plus a tile of slack) are int32 in the kernels' lane arithmetic.
inline void check_table(const TableSpec& t) {
  if (t.dim < 0 || t.dim > (int64_t{1} << 30))
    throw std::invalid_argument("dim must be in [0, 2^30]");
  if (t.chunk_size < 1) throw std::invalid_argument("chunk_size must be >= 1");
  if (t.memory_size < t.chunk_size || t.memory_size % t.chunk_size != 0)
    throw std::invalid_argument("memory_size must be a positive multiple of chunk_size");
  if (t.memory_size / t.chunk_size > (int64_t{1} << 32))
    throw std::invalid_argument("memory_size / chunk_size must not exceed 2^32");
}

// One input of aggregate: 24 bytes, the layout of a row of an int64 [n, 3] tensor whose last
// column holds the float64 bits of the weight.
struct AggregateArray {
  int64_t ptr;
  int64_t size;
  double weight;
};

#if defined(FASTFAIR_WITH_CUDA)
namespace cuda {

// idx_out: int64 [n, dim], sign_out: int8 [n, dim].
void hash_index(uintptr_t rows, int row_size, int64_t n, const TableSpec& t, uintptr_t idx_out,
                uintptr_t sign_out, uintptr_t stream);

// out: [num_bags, dim] of the weight dtype (element_size 4 = float32, 8 = float64).
void bag_forward(uintptr_t weight, int element_size, const BagSpec& bags, const TableSpec& t,
                 uintptr_t out, uintptr_t stream);

// grad_w: [memory_size], zeroed here, then accumulated with atomics.
void bag_backward(uintptr_t grad_out, int element_size, const BagSpec& bags, const TableSpec& t,
                  uintptr_t grad_w, uintptr_t stream);

// The same gradient, bit-identical from run to run: keys sorted by slot, one warp per slot
// (bag_backward_sorted.cu). The workspace (device bytes, at least
// bag_backward_deterministic_workspace) holds the N * ceil(dim / Z) sort keys and values.
size_t bag_backward_deterministic_workspace(int element_size, int64_t num_indices, bool pooled,
                                            const TableSpec& t);
void bag_backward_deterministic(uintptr_t grad_out, int element_size, const BagSpec& bags,
                                const TableSpec& t, uintptr_t grad_w, uintptr_t workspace,
                                size_t workspace_bytes, uintptr_t stream);

// counts: int64 [memory_size], zeroed here.
void slot_counts(int64_t num_embeddings, const TableSpec& t, uintptr_t counts, uintptr_t stream);

// out: [memory_size / factor]; counts: int64 [memory_size].
void fold(uintptr_t weight, int element_size, int64_t memory_size, int64_t factor,
          uintptr_t counts, uintptr_t out, uintptr_t stream);

// out: [size * factor].
void tile(uintptr_t weight, int element_size, int64_t size, int64_t factor, uintptr_t out,
          uintptr_t stream);

// descriptors: device array of num_arrays AggregateArray records; every size divides target_size.
void aggregate(uintptr_t descriptors, int64_t num_arrays, int element_size, uintptr_t out,
               int64_t target_size, uintptr_t stream);

}  // namespace cuda
#endif

}  // namespace fastfair
