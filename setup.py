"""Optional compiled extension (C++/CUDA in csrc/, bound with pybind11 through torch's cpp_extension).

The default install builds nothing and never imports torch here: under pip's build isolation that import would pull a
multi-GB CUDA torch into the build environment. To build the extension:

    RLHF_ENGINE_BUILD_EXT=1 pip install --no-build-isolation -e .

A missing extension is not an error at run time: ``kernels._backend.HAS_CSRC`` is False and every op uses its Triton
kernel (CUDA) or PyTorch reference (CPU).
"""

import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
if os.environ.get("RLHF_ENGINE_BUILD_EXT", "0") == "1":
    if not sources:
        print("[rlhf-engine] RLHF_ENGINE_BUILD_EXT=1 but csrc/ has no sources yet: nothing to build")
    else:
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

        has_cuda = CUDA_HOME is not None and any(s.endswith(".cu") for s in sources)
        make = CUDAExtension if has_cuda else CppExtension
        cpp_sources = sources if has_cuda else [s for s in sources if s.endswith(".cpp")]
        ext_modules = [make("kernels._C", sources=cpp_sources, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})]
        cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
