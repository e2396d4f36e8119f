// pybind11 module genesis_ext._C: raw pointers, shapes, seeds. No libtorch: the Python layer validates,
// allocates and passes pointers (see genesis_ext/ops.py). Long-running calls release the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "deform.h"
#include "deform_cpu.h"
#ifdef GENESIS_WITH_CUDA
#include "cuda/deform_cuda.h"
#endif

namespace py = pybind11;
using namespace genesis;

namespace {

Shape make_shape(const std::vector<int64_t>& spatial) {
  if (spatial.size() != 2 && spatial.size() != 3) throw std::invalid_argument("spatial shape must have 2 or 3 axes");
  Shape sh{int32_t(spatial.size()), {1, 1, 1}};
  for (size_t a = 0; a < spatial.size(); ++a) sh.s[a] = int32_t(spatial[a]);
  return sh;
}

DeformConfig make_config(const std::vector<double>& v) {
  if (v.size() != DeformConfig::kFields) throw std::invalid_argument("config vector has the wrong length");
  return DeformConfig::from_vector(v.data());
}

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// Per-sample parameters of samples offset .. offset+batch-1, as numpy arrays (layout: genesis_ext.sample_params).
py::dict sample_params(int64_t batch, const std::vector<int64_t>& spatial, uint64_t seed, uint64_t offset,
                       const std::vector<double>& config, bool with_blocks) {
  const Shape sh = make_shape(spatial);
  const DeformConfig cfg = make_config(config);
  const py::ssize_t n = batch, d = sh.ndim;
#define GENESIS_ARRAY(type, name) py::array_t<type> name(n);
#define GENESIS_GATE_ARRAY(gate, ...) GENESIS_ARRAY(bool, gate)
#define GENESIS_DRAW_ARRAY(name, ...) GENESIS_ARRAY(float, name)
  GENESIS_SAMPLE_SCALARS(GENESIS_ARRAY)
  GENESIS_GATED(GENESIS_GATE_ARRAY)
  GENESIS_UNIFORM_DRAWS(GENESIS_DRAW_ARRAY)
  py::array_t<bool> flip({n, d});
  py::array_t<double> bez({n, py::ssize_t(4)});
  py::array_t<int32_t> n_holes(n), n_windows(n);
  py::array_t<int32_t> holes({n, py::ssize_t(cfg.max_holes), py::ssize_t(2), d});
  py::array_t<int32_t> windows({n, py::ssize_t(cfg.max_windows), py::ssize_t(2), d});
  py::array_t<int32_t> blocks({with_blocks ? n : 0, py::ssize_t(cfg.num_blocks), py::ssize_t(2), d});
  auto put_boxes = [d](int32_t* dst, const Box* boxes, int count, int capacity) {
    for (int k = 0; k < capacity; ++k)
      for (int a = 0; a < d; ++a) {
        dst[(k * 2 + 0) * d + a] = k < count ? boxes[k].origin[a] : 0;
        dst[(k * 2 + 1) * d + a] = k < count ? boxes[k].size[a] : 0;
      }
  };
  for (py::ssize_t i = 0; i < n; ++i) {
    const SampleParams p = derive_params(seed, offset + i, cfg, sh);
#define GENESIS_PUT(type, name) name.mutable_at(i) = p.name;
    GENESIS_SAMPLE_SCALARS(GENESIS_PUT)
#undef GENESIS_PUT
#define GENESIS_PUT(name, ...) name.mutable_at(i) = p.name;
    GENESIS_GATED(GENESIS_PUT)
    GENESIS_UNIFORM_DRAWS(GENESIS_PUT)
#undef GENESIS_PUT
    for (int a = 0; a < d; ++a) flip.mutable_at(i, a) = p.flip[a];
    for (int j = 0; j < 4; ++j) bez.mutable_at(i, j) = p.ctrl[j];
    n_holes.mutable_at(i) = p.n_holes, n_windows.mutable_at(i) = p.n_windows;
    put_boxes(holes.mutable_data(i), p.holes, p.n_holes, cfg.max_holes);
    put_boxes(windows.mutable_data(i), p.windows, p.n_windows, cfg.max_windows);
    if (with_blocks)
      for (int32_t b = 0; b < cfg.num_blocks; ++b) {
        Stream st(seed, offset + i, BLOCK, uint32_t(b));
        const Box box = shuffle_block(st, cfg, sh);
        put_boxes(blocks.mutable_data(i, b), &box, 1, 1);
      }
  }
  py::dict out;
#define GENESIS_OUT(type, name) out[#name] = name;
  GENESIS_SAMPLE_SCALARS(GENESIS_OUT)
#undef GENESIS_OUT
#define GENESIS_OUT(name, ...) out[#name] = name;
  GENESIS_GATED(GENESIS_OUT)
  GENESIS_UNIFORM_DRAWS(GENESIS_OUT)
#undef GENESIS_OUT
#undef GENESIS_ARRAY
#undef GENESIS_GATE_ARRAY
#undef GENESIS_DRAW_ARRAY
  out["flip"] = flip, out["bezier"] = bez;
  out["n_holes"] = n_holes, out["holes"] = holes, out["n_windows"] = n_windows, out["windows"] = windows;
  if (with_blocks) out["blocks"] = blocks;
  return out;
}

py::dict build_info() {
  py::dict info;
#ifdef _OPENMP
  info["with_openmp"] = true;
#else
  info["with_openmp"] = false;
#endif
#ifdef GENESIS_WITH_CUDA
  info["with_cuda"] = true;
  info["cuda_archs"] = GENESIS_CUDA_ARCHS;
  info["cuda_devices"] = cuda::device_count();
  info["cuda_unavailable_reason"] = cuda::unavailable_reason();
#else
  info["with_cuda"] = false;
  info["cuda_archs"] = "";
  info["cuda_devices"] = 0;
  info["cuda_unavailable_reason"] = "genesis_ext was built without CUDA";
#endif
  return info;
}

}  // namespace

// GENESIS_MODULE: _C, or _C_emu (the CUDA kernels executed on the host by HIP-CPU; see CMakeLists.txt).
PYBIND11_MODULE(GENESIS_MODULE, m) {
  m.doc() = "genesis_ext core: Models Genesis deformation kernels (raw-pointer interface; use genesis_ext.ops)";
  m.def(
      "philox4x32_10",
      [](std::array<uint32_t, 4> ctr, std::array<uint32_t, 2> key) {
        const U32x4 r = philox4x32_10(U32x4{{ctr[0], ctr[1], ctr[2], ctr[3]}}, key[0], key[1]);
        return std::array<uint32_t, 4>{r.v[0], r.v[1], r.v[2], r.v[3]};
      },
      "Philox4x32-10 of one counter and key (the shared header's implementation).");
  m.def(
      "deform_cpu",
      [](int32_t op, uintptr_t in, uintptr_t out, uintptr_t target, int64_t batch, int64_t channels,
         const std::vector<int64_t>& spatial, uint64_t seed, uint64_t offset, const std::vector<double>& config,
         int num_threads) {
        const Shape sh = make_shape(spatial);
        const DeformConfig cfg = make_config(config);
        py::gil_scoped_release release;
        deform_cpu(Op(op), ptr<const float>(in), ptr<float>(out), target ? ptr<float>(target) : nullptr, batch,
                   channels, sh, seed, offset, cfg, num_threads);
      },
      py::arg("op"), py::arg("input"), py::arg("out"), py::arg("target"), py::arg("batch"), py::arg("channels"),
      py::arg("spatial"), py::arg("seed"), py::arg("offset"), py::arg("config"), py::arg("num_threads"));
  m.def(
      "shuffle_sources",
      [](uint64_t seed, uint64_t sample, const std::vector<uint32_t>& blocks, int32_t n) {
        if (n < 1) throw std::invalid_argument("shuffle_sources: n must be >= 1");
        py::array_t<int32_t> out({py::ssize_t(blocks.size()), py::ssize_t(n)});
        int32_t* dst = out.mutable_data();
        py::gil_scoped_release release;
        for (const uint32_t b : blocks)
          for (int32_t p = 0; p < n; ++p) *dst++ = shuffle_source(seed, sample, b, n, p);
        return out;
      },
      py::arg("seed"), py::arg("sample"), py::arg("blocks"), py::arg("n"),
      "pi(p) for p < n of each block index (of n voxels): shuffle_source, the kernels' per-voxel body.");
  m.def("sample_params", &sample_params, py::arg("batch"), py::arg("spatial"), py::arg("seed"), py::arg("offset"),
        py::arg("config"), py::arg("with_blocks"));
  m.def("build_info", &build_info);
#ifdef GENESIS_WITH_CUDA
  m.attr("WITH_CUDA") = true;  // what was compiled; asks the driver nothing (build_info does)
#else
  m.attr("WITH_CUDA") = false;
#endif
#define GENESIS_NAME(type, name) std::pair<std::string, std::string>(#name, #type),
  const std::vector<std::pair<std::string, std::string>> config_fields{GENESIS_CONFIG_FIELDS(GENESIS_NAME)};
#undef GENESIS_NAME
  m.attr("CONFIG_FIELDS") = py::tuple(py::cast(config_fields));  // (name, C++ type) in order
  py::dict ops;
#define GENESIS_OP_ENTRY(gate, code, name, ...) ops[#name] = int(code);
  GENESIS_OPS(GENESIS_OP_ENTRY)
#undef GENESIS_OP_ENTRY
  m.attr("OPS") = ops;
  py::dict purposes;
#define GENESIS_PURPOSE_ENTRY(name, value) purposes[#name] = int(genesis::name);
  GENESIS_PURPOSES(GENESIS_PURPOSE_ENTRY)
#undef GENESIS_PURPOSE_ENTRY
  m.attr("PURPOSES") = purposes;  // docs/randomness.md: name -> the counter's purpose word
  m.attr("STREAM_VERSION") = kStreamVersion;
#ifdef GENESIS_WITH_CUDA
  m.def(
      "cuda_philox4x32_10",
      [](uintptr_t ctr, uintptr_t key, uintptr_t out, int64_t n, int device, uintptr_t stream) {
        cuda::philox_known_answers(ptr<const uint32_t>(ctr), ptr<const uint32_t>(key), ptr<uint32_t>(out), n, device,
                                   stream);
      },
      "Philox4x32-10 over n device counters/keys on the given device and stream (device pointers).");
  m.def("cuda_synchronize", &cuda::synchronize, py::arg("device"), py::call_guard<py::gil_scoped_release>(),
        "Wait for all work queued on the device.");
  m.def(
      "cuda_scratch_bytes",
      [](int32_t op, int64_t batch, const std::vector<int64_t>& spatial, const std::vector<double>& config) {
        return cuda::scratch_bytes(Op(op), batch, make_shape(spatial), make_config(config));
      },
      py::arg("op"), py::arg("batch"), py::arg("spatial"), py::arg("config"));
  m.def(
      "deform_cuda",
      [](int32_t op, uintptr_t in, uintptr_t out, uintptr_t target, int64_t batch, int64_t channels,
         const std::vector<int64_t>& spatial, uint64_t seed, uint64_t offset, const std::vector<double>& config,
         uintptr_t scratch, size_t scratch_size, int device, uintptr_t stream) {
        const Shape sh = make_shape(spatial);
        const DeformConfig cfg = make_config(config);
        py::gil_scoped_release release;
        cuda::deform_cuda(Op(op), ptr<const float>(in), ptr<float>(out), target ? ptr<float>(target) : nullptr, batch,
                          channels, sh, seed, offset, cfg, ptr<void>(scratch), scratch_size, device, stream);
      },
      py::arg("op"), py::arg("input"), py::arg("out"), py::arg("target"), py::arg("batch"), py::arg("channels"),
      py::arg("spatial"), py::arg("seed"), py::arg("offset"), py::arg("config"), py::arg("scratch"),
      py::arg("scratch_size"), py::arg("device"), py::arg("stream"));
#endif
#ifdef GENESIS_HIP_CPU
  m.def(
      "barrier_probe",
      [](uintptr_t out, int32_t blocks, int32_t threads, int32_t tag, bool barrier) {
        cuda::barrier_probe(ptr<int32_t>(out), blocks, threads, tag, barrier);
      },
      py::arg("out"), py::arg("blocks"), py::arg("threads"), py::arg("tag"), py::arg("barrier"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "launch_order_probe",
      [](uintptr_t out, int32_t blocks, int32_t threads, int32_t rounds) {
        return cuda::launch_order_probe(ptr<int32_t>(out), blocks, threads, rounds);
      },
      py::arg("out"), py::arg("blocks"), py::arg("threads"), py::arg("rounds"),
      py::call_guard<py::gil_scoped_release>());
#endif
}
