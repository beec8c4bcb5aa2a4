// Makes the extension importable as vitos_ext._C: importing it runs the static op registrations.
// Kept apart from the kernels so CMakeLists.txt can build a plain shared library without Python.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
