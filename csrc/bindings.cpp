// fastfair._C: the hash contract on the host, and the CUDA launchers when they were compiled in.
//
// The module does not link libtorch: tensors cross as (data pointer, element size, sizes) and the
// stream as its cudaStream_t value, so one build works with any torch. The Python side
// (fastfair/kernels/cuda_backend.py) checks dtypes, devices, contiguity and sizes.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "fastfair_build_info.h"
#include "hash.h"
#include "ops.h"

namespace py = pybind11;

namespace {

#if defined(FASTFAIR_WITH_CUDA)
constexpr bool kHasCuda = true;
#else
constexpr bool kHasCuda = false;
#endif

// The contract on the host, one address hash per chunk and one sign word per 32 columns, exactly
// as the kernels compute it; lets CPU-only CI check this header against the frozen test vectors.
void hash_index_cpu(uintptr_t rows_ptr, int64_t n, int64_t dim, int64_t memory_size,
                    int64_t chunk_size, uint32_t ka, uint32_t ks, bool is_signed,
                    uintptr_t idx_out_ptr, uintptr_t sign_out_ptr) {
  const fastfair::TableSpec spec{dim, memory_size, chunk_size, ka, ks, is_signed};
  fastfair::check_table(spec);
  if (n < 0) throw std::invalid_argument("hash_index_cpu: n must be >= 0");
  const auto* rows = reinterpret_cast<const int64_t*>(rows_ptr);
  auto* idx = reinterpret_cast<int64_t*>(idx_out_ptr);
  auto* sign = reinterpret_cast<int8_t*>(sign_out_ptr);
  const fastfair::FastMod slots =
      fastfair::FastMod::make(static_cast<uint64_t>(memory_size / chunk_size));
  py::gil_scoped_release release;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t row = static_cast<uint32_t>(rows[i]);
    const uint32_t addr_mix = fastfair::row_mix(row, ka);
    int64_t* idx_row = idx + i * dim;
    uint32_t c = 0;
    for (int64_t k0 = 0; k0 < dim; ++c) {
      const int64_t end = chunk_size < dim - k0 ? k0 + chunk_size : dim;
      const int64_t base = chunk_size * slots.mod(fastfair::chunk_mix(addr_mix, c));
      for (int64_t k = k0; k < end; ++k) idx_row[k] = base + (k - k0);
      k0 = end;
    }
    const uint32_t sign_mix = fastfair::row_mix(row, ks);
    int8_t* sign_row = sign + i * dim;
    for (int64_t k0 = 0; k0 < dim; k0 += 32) {
      const uint32_t word =
          is_signed ? fastfair::chunk_mix(sign_mix, static_cast<uint32_t>(k0 >> 5)) : 0u;
      const int64_t end = k0 + 32 < dim ? k0 + 32 : dim;
      for (int64_t k = k0; k < end; ++k)
        sign_row[k] = ((word >> (k - k0)) & 1u) ? int8_t{-1} : int8_t{1};
    }
  }
}

#if defined(FASTFAIR_WITH_CUDA)
fastfair::BagSpec bag_spec(uintptr_t indices, int index_size, int64_t num_indices,
                           uintptr_t offsets, int64_t num_bags, uintptr_t per_sample_weights,
                           int mode, int64_t padding_idx) {
  if (mode != 0 && mode != 1) throw std::invalid_argument("mode must be 0 (sum) or 1 (mean)");
  if (num_indices < 0 || num_bags < 0)
    throw std::invalid_argument("num_indices and num_bags must be >= 0");
  return {indices, index_size, num_indices, offsets, num_bags, per_sample_weights, mode,
          padding_idx};
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "fastfair native extension: the hash contract on the host and, when built with CUDA, the "
      "kernel launchers. Tensors are passed as data pointers, streams as cudaStream_t values.";
  m.attr("HASH_VERSION") = fastfair::kHashVersion;

  m.def(
      "has_cuda", [] { return kHasCuda; },
      "Whether the CUDA kernels were compiled into this build.");
  m.def(
      "cuda_archs", [] { return std::string(FASTFAIR_CUDA_ARCHS); },
      "The CUDA architectures compiled in (CMake syntax, e.g. '80;90'), '' without CUDA.");
  m.def("hash_index_cpu", &hash_index_cpu, py::arg("rows_ptr"), py::arg("n"), py::arg("dim"),
        py::arg("memory_size"), py::arg("chunk_size"), py::arg("ka"), py::arg("ks"),
        py::arg("signed"), py::arg("idx_out_ptr"), py::arg("sign_out_ptr"),
        "Addresses (int64 [n, dim]) and signs (int8 [n, dim]) of int64 rows [n], on the host.");

#if defined(FASTFAIR_WITH_CUDA)
  namespace fc = fastfair::cuda;
  using Release = py::call_guard<py::gil_scoped_release>;

  m.def(
      "hash_index_cuda",
      [](uintptr_t rows_ptr, int row_size, int64_t n, int64_t dim, int64_t memory_size,
         int64_t chunk_size, uint32_t ka, uint32_t ks, bool is_signed, uintptr_t idx_out_ptr,
         uintptr_t sign_out_ptr, uintptr_t stream) {
        if (n < 0) throw std::invalid_argument("hash_index_cuda: n must be >= 0");
        fc::hash_index(rows_ptr, row_size, n, {dim, memory_size, chunk_size, ka, ks, is_signed},
                       idx_out_ptr, sign_out_ptr, stream);
      },
      Release(), py::arg("rows_ptr"), py::arg("row_size"), py::arg("n"), py::arg("dim"),
      py::arg("memory_size"), py::arg("chunk_size"), py::arg("ka"), py::arg("ks"),
      py::arg("signed"), py::arg("idx_out_ptr"), py::arg("sign_out_ptr"), py::arg("stream"));

  m.def(
      "bag_forward_cuda",
      [](uintptr_t weight_ptr, int element_size, uintptr_t indices_ptr, int index_size,
         int64_t num_indices, uintptr_t offsets_ptr, int64_t num_bags,
         uintptr_t per_sample_weights_ptr, uintptr_t out_ptr, int64_t dim, int64_t memory_size,
         int64_t chunk_size, uint32_t ka, uint32_t ks, bool is_signed, int mode,
         int64_t padding_idx, uintptr_t stream) {
        fc::bag_forward(weight_ptr, element_size,
                        bag_spec(indices_ptr, index_size, num_indices, offsets_ptr, num_bags,
                                 per_sample_weights_ptr, mode, padding_idx),
                        {dim, memory_size, chunk_size, ka, ks, is_signed}, out_ptr, stream);
      },
      Release(), py::arg("weight_ptr"), py::arg("element_size"), py::arg("indices_ptr"),
      py::arg("index_size"), py::arg("num_indices"), py::arg("offsets_ptr"), py::arg("num_bags"),
      py::arg("per_sample_weights_ptr"), py::arg("out_ptr"), py::arg("dim"),
      py::arg("memory_size"), py::arg("chunk_size"), py::arg("ka"), py::arg("ks"),
      py::arg("signed"), py::arg("mode"), py::arg("padding_idx"), py::arg("stream"),
      "offsets_ptr == 0: every index is its own bag; per_sample_weights_ptr == 0: all ones.");

  m.def(
      "bag_backward_cuda",
      [](uintptr_t grad_out_ptr, int element_size, uintptr_t indices_ptr, int index_size,
         int64_t num_indices, uintptr_t offsets_ptr, int64_t num_bags,
         uintptr_t per_sample_weights_ptr, uintptr_t grad_w_ptr, int64_t dim,
         int64_t memory_size, int64_t chunk_size, uint32_t ka, uint32_t ks, bool is_signed,
         int mode, int64_t padding_idx, uintptr_t stream) {
        fc::bag_backward(grad_out_ptr, element_size,
                         bag_spec(indices_ptr, index_size, num_indices, offsets_ptr, num_bags,
                                  per_sample_weights_ptr, mode, padding_idx),
                         {dim, memory_size, chunk_size, ka, ks, is_signed}, grad_w_ptr, stream);
      },
      Release(), py::arg("grad_out_ptr"), py::arg("element_size"), py::arg("indices_ptr"),
      py::arg("index_size"), py::arg("num_indices"), py::arg("offsets_ptr"),
      py::arg("num_bags"), py::arg("per_sample_weights_ptr"), py::arg("grad_w_ptr"),
      py::arg("dim"), py::arg("memory_size"), py::arg("chunk_size"), py::arg("ka"),
      py::arg("ks"), py::arg("signed"), py::arg("mode"), py::arg("padding_idx"),
      py::arg("stream"), "grad_w (memory_size elements) is zeroed, then accumulated.");

  m.def(
      "bag_backward_deterministic_workspace",
      [](int element_size, int64_t num_indices, bool pooled, int64_t dim, int64_t memory_size,
         int64_t chunk_size) {
        return fc::bag_backward_deterministic_workspace(
            element_size, num_indices, pooled, {dim, memory_size, chunk_size, 0, 0, false});
      },
      py::arg("element_size"), py::arg("num_indices"), py::arg("pooled"), py::arg("dim"),
      py::arg("memory_size"), py::arg("chunk_size"),
      "Bytes of device workspace bag_backward_deterministic_cuda needs for these sizes.");

  m.def(
      "bag_backward_deterministic_cuda",
      [](uintptr_t grad_out_ptr, int element_size, uintptr_t indices_ptr, int index_size,
         int64_t num_indices, uintptr_t offsets_ptr, int64_t num_bags,
         uintptr_t per_sample_weights_ptr, uintptr_t grad_w_ptr, int64_t dim,
         int64_t memory_size, int64_t chunk_size, uint32_t ka, uint32_t ks, bool is_signed,
         int mode, int64_t padding_idx, uintptr_t workspace_ptr, size_t workspace_bytes,
         uintptr_t stream) {
        fc::bag_backward_deterministic(
            grad_out_ptr, element_size,
            bag_spec(indices_ptr, index_size, num_indices, offsets_ptr, num_bags,
                     per_sample_weights_ptr, mode, padding_idx),
            {dim, memory_size, chunk_size, ka, ks, is_signed}, grad_w_ptr, workspace_ptr,
            workspace_bytes, stream);
      },
      Release(), py::arg("grad_out_ptr"), py::arg("element_size"), py::arg("indices_ptr"),
      py::arg("index_size"), py::arg("num_indices"), py::arg("offsets_ptr"),
      py::arg("num_bags"), py::arg("per_sample_weights_ptr"), py::arg("grad_w_ptr"),
      py::arg("dim"), py::arg("memory_size"), py::arg("chunk_size"), py::arg("ka"),
      py::arg("ks"), py::arg("signed"), py::arg("mode"), py::arg("padding_idx"),
      py::arg("workspace_ptr"), py::arg("workspace_bytes"), py::arg("stream"),
      "grad_w is zeroed, then every hit slot written once by its owner: the same bits on every "
      "run. workspace: at least bag_backward_deterministic_workspace(...) device bytes.");

  m.def(
      "slot_counts_cuda",
      [](int64_t num_embeddings, int64_t dim, int64_t memory_size, int64_t chunk_size,
         uint32_t ka, uintptr_t counts_ptr, uintptr_t stream) {
        fc::slot_counts(num_embeddings, {dim, memory_size, chunk_size, ka, 0, false}, counts_ptr,
                        stream);
      },
      Release(), py::arg("num_embeddings"), py::arg("dim"), py::arg("memory_size"),
      py::arg("chunk_size"), py::arg("ka"), py::arg("counts_ptr"), py::arg("stream"),
      "counts (int64, memory_size elements) is zeroed, then filled.");

  m.def("fold_cuda", &fc::fold, Release(), py::arg("weight_ptr"), py::arg("element_size"),
        py::arg("memory_size"), py::arg("factor"), py::arg("counts_ptr"), py::arg("out_ptr"),
        py::arg("stream"));
  m.def("tile_cuda", &fc::tile, Release(), py::arg("weight_ptr"), py::arg("element_size"),
        py::arg("size"), py::arg("factor"), py::arg("out_ptr"), py::arg("stream"));
  m.def("aggregate_cuda", &fc::aggregate, Release(), py::arg("descriptors_ptr"),
        py::arg("num_arrays"), py::arg("element_size"), py::arg("out_ptr"),
        py::arg("target_size"), py::arg("stream"),
        "descriptors: device int64 [num_arrays, 3] rows (data_ptr, size, float64 bits of the "
        "weight); every size must divide target_size.");
#endif
}
