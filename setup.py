"""Build script: drives CMake to build the pybind11 module ``kvpo_kernels._C`` from ``csrc/``.

The C++ CPU kernels are always built. The CUDA kernels are built when nvcc is found, unless
``KVPO_SKIP_CUDA_BUILD=1``. Architectures come from ``KVPO_CUDA_ARCHS`` (default ``80;90``), so a machine with
nvcc and no GPU compiles them. Nothing links against torch: the extension takes raw pointers and the current CUDA
stream from Python, so one build serves every torch version.

A machine without CMake or a C++ compiler still installs the pure-Python package (Triton and reference backends);
``kvpo_kernels.available_backends()`` then says why the ``cpu``/``cuda`` backends are missing. Set
``KVPO_REQUIRE_EXTENSION=1`` to turn that into a build failure (CI does).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        try:
            self._build_with_cmake(ext)
        except (OSError, subprocess.CalledProcessError) as err:
            if os.environ.get("KVPO_REQUIRE_EXTENSION") == "1":
                raise
            print(f"kvpo_kernels: C++/CUDA extension not built ({err}); the triton and torch backends still work.",
                  file=sys.stderr)

    def _build_with_cmake(self, ext: Extension) -> None:
        cmake = shutil.which("cmake")
        if cmake is None:
            raise OSError("cmake not found on PATH")
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPYTHON_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DKVPO_WITH_CUDA={'OFF' if os.environ.get('KVPO_SKIP_CUDA_BUILD') == '1' else 'AUTO'}",
            f"-DKVPO_CUDA_ARCHS={os.environ.get('KVPO_CUDA_ARCHS', '80;90')}",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(max(1, min(os.cpu_count() or 1, 8))))
        subprocess.run([cmake, str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run([cmake, "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


setup(ext_modules=[CMakeExtension("kvpo_kernels._C")], cmdclass={"build_ext": CMakeBuild})
