// placeholder: the streaming packer lands here
#include <pybind11/pybind11.h>
PYBIND11_MODULE(_packer, m) { m.doc() = "streaming packer"; }
