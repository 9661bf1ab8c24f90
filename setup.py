"""Build of fastmeta._C (csrc/) with torch's C++ extension tooling.

CPU kernels are always built; CUDA kernels (csrc/*.cu) when torch has CUDA and nvcc is found
(FASTMETA_BUILD_CUDA=auto|0|1). A missing compiler or a failed build never fails the install:
fastmeta then runs on its torch backend and `python -m fastmeta.info` shows the reason, which is
written to fastmeta/_build_status.json next to the package.
"""
import glob
import json
import os
import platform
import shlex
import subprocess
import sys
import traceback

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _status_path():
    return os.path.join(HERE, "fastmeta", "_build_status.json")


def _write_status(**status):
    with open(_status_path(), "w") as f:
        json.dump(status, f, indent=1)


def _shared_libstdcxx():
    """The shared libstdc++ as a link input, so that fastmeta._C uses the C++ runtime torch uses.

    A compiler that links libstdc++ statically by default (some toolchains wrap g++ so) puts a
    private copy into the extension; with Python's -Bsymbolic-functions its code then runs against
    the process's libstdc++ data (locale facets), and formatting a number into an error message
    crashes the process or cuts the message short. Named first, the shared library resolves those
    symbols and the static copy is never pulled in. Empty where the compiler does not know the
    file (not GCC's runtime, not Linux)."""
    if not sys.platform.startswith("linux"):
        return []
    cxx = shlex.split(os.environ.get("CXX", "c++"))  # the compiler torch's build uses
    try:
        found = subprocess.run(cxx + ["-print-file-name=libstdc++.so.6"], capture_output=True, text=True,
                               timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return []
    return [found] if os.path.isabs(found) and os.path.isfile(found) else []


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as e:  # torch not importable at build time: pure-Python install
        _write_status(cpp=False, cuda=False, reason=f"torch not importable at build time: {e}")
        return [], {}

    want_cuda = os.environ.get("FASTMETA_BUILD_CUDA", "auto").lower()
    has_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if want_cuda == "1" and not has_cuda:
        raise RuntimeError("FASTMETA_BUILD_CUDA=1 but torch has no CUDA or nvcc was not found "
                           f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
    build_cuda = has_cuda and want_cuda != "0"
    if not build_cuda:
        why_no_cuda = ("FASTMETA_BUILD_CUDA=0" if want_cuda == "0" else
                       f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}")
    else:
        why_no_cuda = None

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # -fopenmp: at::parallel_for is a header template that only runs in parallel when the
    # extension itself is compiled with OpenMP (torch's CPU wheels use GNU OpenMP too).
    # -g0 unless FASTMETA_DEBUG_INFO=1: Python's compile flags ask for debug information, which
    # doubles the time to compile these files (ATen's and pybind11's templates) for nothing a
    # release build uses; symbols stay either way.
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    if os.environ.get("FASTMETA_DEBUG_INFO", "0") != "1":
        cxx.append("-g0")
    if platform.machine() in ("x86_64", "AMD64") and os.environ.get("FASTMETA_NATIVE", "1") == "1":
        cxx.append("-march=native")
    extra = {"cxx": cxx}
    link = _shared_libstdcxx() + ["-fopenmp"]
    macros = []
    if build_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        arch = os.environ.get("FASTMETA_CUDA_ARCH", "")
        nvcc = ["-O3", "-std=c++17", "-lineinfo"]
        if arch:
            nvcc += [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
        extra["nvcc"] = nvcc
        macros.append(("FASTMETA_WITH_CUDA", "1"))
        ext = CUDAExtension("fastmeta._C", sources, extra_compile_args=extra, define_macros=macros,
                            extra_link_args=link)
    else:
        ext = CppExtension("fastmeta._C", sources, extra_compile_args=extra, define_macros=macros,
                           extra_link_args=link)

    class TolerantBuild(BuildExtension):
        """Builds fastmeta._C; on failure records why and lets the install go on."""

        def build_extensions(self):
            cuda_built, no_cuda = build_cuda, why_no_cuda
            try:
                super().build_extensions()
            except Exception as e:
                if not build_cuda:
                    _write_status(cpp=False, cuda=False,
                                  reason=f"C++ build failed: {type(e).__name__}: {e}",
                                  log=traceback.format_exc()[-4000:])
                    return
                # the CUDA part failed: keep the CPU kernels
                no_cuda = f"CUDA build failed: {type(e).__name__}: {e}"
                log = traceback.format_exc()[-4000:]
                cuda_built = False
                for ext in self.extensions:
                    ext.sources = [src for src in ext.sources if os.sep + "cuda" + os.sep not in src]
                    ext.define_macros = [m for m in ext.define_macros if m[0] != "FASTMETA_WITH_CUDA"]
                    if isinstance(ext.extra_compile_args, dict):
                        ext.extra_compile_args = ext.extra_compile_args["cxx"]
                try:
                    super().build_extensions()
                except Exception as e2:
                    _write_status(cpp=False, cuda=False,
                                  reason=f"C++ build failed: {type(e2).__name__}: {e2}",
                                  log=traceback.format_exc()[-4000:])
                    return
                _write_status(cpp=True, cuda=False, reason=None, no_cuda_reason=no_cuda, log=log,
                              torch=torch.__version__)
                return
            _write_status(cpp=True, cuda=cuda_built, reason=None, no_cuda_reason=no_cuda,
                          torch=torch.__version__)

    return [ext], {"build_ext": TolerantBuild.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
