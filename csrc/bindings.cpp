// The compiled core's boundary: the schemas of torch.ops.intcoop_C.* (one place), and the Python module
// `intcoop._C` whose import loads this library. Kernels register per device in csrc/cpu and csrc/cuda
// (TORCH_LIBRARY_IMPL); the positional arguments match the torch backends in intcoop/ops/*.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(intcoop_C, m) {
  // q [B, Tq, H, Dh], k/v [B, Tk, H, Dh], pk/pv [B, P, H, Dh], cu_q/cu_k [S+1] int32 -> out like q, lse [B, H, Tq]
  m.def(
      "prefix_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor pk, Tensor pv, Tensor cu_q, Tensor cu_k, "
      "int max_q, int max_k, float scale) -> (Tensor, Tensor)");
  // -> dq, dk, dv, dpk, dpv (prefix gradients summed over the segments of each image)
  m.def(
      "prefix_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor pk, Tensor pv, Tensor out, "
      "Tensor lse, Tensor cu_q, Tensor cu_k, int max_q, int max_k, float scale) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // qt [R, W], z [B, L, W] -> pooled [B, R, W], lse [B, R]
  m.def("patch_pool_fwd(Tensor qt, Tensor z, float scale) -> (Tensor, Tensor)");
  // -> dqt [R, W] (summed over images), dz [B, L, W] or empty(0) when not need_dz
  m.def(
      "patch_pool_bwd(Tensor dpooled, Tensor qt, Tensor z, Tensor pooled, Tensor lse, float scale, bool need_dz) "
      "-> (Tensor, Tensor)");
}

// `import intcoop._C` only needs to load this shared library (which runs the registrations above); the module
// itself is empty, so no pybind11 is compiled in.
static PyModuleDef intcoop_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                       "intcoop's compiled ops, registered as torch.ops.intcoop_C.*", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&intcoop_c_module); }
