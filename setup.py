"""Build vitos_ext._C: the C++ (and, when possible, CUDA) kernels registered under torch.ops.vitos.

A CUDAExtension is built when torch is a CUDA build and nvcc is found, otherwise a CppExtension.
Environment:
  VITOS_FORCE_CPU=1      build the CPU-only extension even when CUDA is available
  TORCH_CUDA_ARCH_LIST   GPU architectures to build for (default "8.0;9.0")
  CUDA_HOME              CUDA toolkit root (default /usr/local/cuda when it exists)
  MAX_JOBS               parallel compile jobs (ninja)
Build with `pip install --no-build-isolation .` (torch must already be installed).
"""

import glob
import os

# cpp_extension resolves CUDA_HOME at import time; /usr/local/bin/nvcc may be a wrapper script whose parent is not
# a toolkit root, so point at the real toolkit first.
if "CUDA_HOME" not in os.environ and os.path.isfile("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    if os.environ.get("VITOS_FORCE_CPU", "0") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def nvidia_wheel_includes() -> list[str]:
    """Headers of the nvidia-* wheels (cuBLAS, cuSPARSE, ...) that ATen/cuda includes pull in."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(p for p in glob.glob(os.path.join(site, "nvidia", "*", "include")) if os.path.isdir(p))


def extension():
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx_flags = ["-O3"]
    if not want_cuda():
        return cpp_extension.CppExtension(
            "vitos_ext._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, py_limited_api=True
        )
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # no --use_fast_math: the box->cell rounding and the fusion mean must match the float32 reference exactly
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    return cpp_extension.CUDAExtension(
        "vitos_ext._C",
        cpp_sources + cuda_sources,
        include_dirs=nvidia_wheel_includes(),
        extra_compile_args={"cxx": cxx_flags + ["-DVITOS_WITH_CUDA"], "nvcc": nvcc_flags},
        py_limited_api=True,
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
