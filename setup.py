"""Build script: finds charlm's packages, maps kernels/ to ``charlm.kernels`` and builds the C++ loader through CMake.

The C++ extension ``charlm._loader`` is configured by CMakeLists.txt (pybind11 + Ninja). Everything
else is in pyproject.toml.
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt, putting the module where setuptools expects it."""

    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        build_type = os.environ.get("CHARLM_BUILD_TYPE", "Debug" if self.debug else "Release")
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            *os.environ.get("CHARLM_CMAKE_ARGS", "").split(),
        ]
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel"], check=True)


has_loader_sources = any((ROOT / "csrc").glob("*.cpp"))

setup(
    # charlm/kernels is a git-ignored link to kernels/ in development checkouts: excluded here, mapped below.
    packages=find_packages(include=["charlm", "charlm.*"], exclude=["charlm.kernels", "charlm.kernels.*"])
    + ["charlm.kernels"],
    package_dir={"charlm": "charlm", "charlm.kernels": "kernels"},
    ext_modules=[CMakeExtension("charlm._loader")] if has_loader_sources else [],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
