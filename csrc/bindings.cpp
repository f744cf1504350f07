// pybind11 bindings of the batch loader: module charlm._loader (pybind11 and NumPy arrays only, no torch).
// charlm.loader.BatchLoader is the only caller; it checks the arguments and turns arrays into tensors.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <string>
#include <vector>

#include "loader.h"

namespace py = pybind11;
using charlm::Loader;

namespace {

std::vector<int64_t> column(const py::array_t<int64_t>& spans, int64_t c) {
  auto s = spans.unchecked<2>();
  std::vector<int64_t> out(s.shape(0));
  for (py::ssize_t i = 0; i < s.shape(0); ++i) out[i] = s(i, c);
  return out;
}

std::unique_ptr<Loader> make_loader(const std::string& path, int itemsize, int64_t n_tokens,
                                    const py::array_t<uint8_t, py::array::c_style>& word,
                                    const py::array_t<int64_t, py::array::c_style>& spans,
                                    int64_t batch_size, int64_t block_size, int64_t rank, int64_t world_size,
                                    uint64_t seed, int tipa, int64_t tipa_max, int threads) {
  if (spans.ndim() != 2 || spans.shape(1) != 2) throw std::invalid_argument("spans must have shape (N, 2)");
  if (tipa < 0 || tipa > 2) throw std::invalid_argument("tipa must be 0 (off), 1 (word) or 2 (window)");
  charlm::LoaderConfig config{n_tokens, std::vector<uint8_t>(word.data(), word.data() + word.size()),
                              column(spans, 0), column(spans, 1), batch_size, block_size, rank,
                              world_size, seed, static_cast<charlm::Tipa>(tipa), tipa_max, threads};
  return std::make_unique<Loader>(charlm::TokenFile::open(path, itemsize), std::move(config));
}

// (x, y, t-or-None): NumPy views of one batch, owning its memory through a shared capsule: no copy.
py::tuple batch(Loader& loader, int64_t step) {
  std::unique_ptr<int64_t[]> data;
  {
    py::gil_scoped_release nogil;
    data = loader.take(step);
  }
  const int64_t B = loader.local_batch_size(), T = loader.block_size();
  int64_t* base = data.get();
  py::capsule owner(data.release(), [](void* p) { delete[] static_cast<int64_t*>(p); });
  auto view = [&](int k) -> py::object {
    return py::array_t<int64_t>({B, T}, {T * 8, int64_t{8}}, base + k * B * T, owner);
  };
  return py::make_tuple(view(0), view(1), loader.tipa() ? view(2) : py::none());
}

}  // namespace

PYBIND11_MODULE(_loader, m) {
  m.doc() = "C++ batch loader behind charlm.loader.BatchLoader (see charlm/loader.py for the definitions)";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const std::system_error& e) {  // open/fstat/mmap failures name the file, thread starts the count
      PyErr_SetString(PyExc_OSError, e.what());
    }
  });

  py::class_<Loader>(m, "Loader")
      .def(py::init(&make_loader), py::arg("path"), py::arg("itemsize"), py::arg("n_tokens"), py::arg("word"),
           py::arg("spans"), py::arg("batch_size"), py::arg("block_size"), py::arg("rank"),
           py::arg("world_size"), py::arg("seed"), py::arg("tipa"), py::arg("tipa_max"), py::arg("threads"))
      .def("batch", &batch, py::arg("step"),
           "(x, y, t or None) of a step: int64 arrays (B_local, T) owning their memory")
      .def("max_token", &Loader::max_token, py::call_guard<py::gil_scoped_release>(),
           "The largest token id in the file: scanned once per mapping, which the file's loaders share")
      .def("close", &Loader::close, py::call_guard<py::gil_scoped_release>(), "Stop and join the threads");
}
