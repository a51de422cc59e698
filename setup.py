"""Build: setuptools drives CMake, which builds the pybind11 module unimlm_engine._C.

`export/` is installed as `unimlm_engine.export` (see DESIGN.md section 2). The Triton kernels live in
`unimlm_engine/kernels/` itself: a `kernels/` package at the repository root shadowed Hugging Face's `kernels`
package (a dependency of transformers >= 5.2x) whenever the root was on sys.path (pytest, `python -m`).

Environment knobs:
  UNIMLM_CUDA=AUTO|ON|OFF   compile csrc/kernels CUDA sources. ON: fail the build (a CMake error
                            naming what is missing) without nvcc / the CUDA toolkit. AUTO (default):
                            build them when found, else build without and say so in a CMake
                            STATUS line (`pip install -v` shows it; `_C.with_cuda` is then False).
  UNIMLM_BUILD_TYPE=Release|Debug|RelWithDebInfo
  UNIMLM_SANITIZE=1         AddressSanitizer + UBSan build (for the C++ tests)
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def cuda_option() -> str:
    """UNIMLM_CUDA, upper-cased and checked (a typo must not quietly mean AUTO)."""
    value = os.environ.get("UNIMLM_CUDA", "AUTO").strip().upper() or "AUTO"
    if value not in ("AUTO", "ON", "OFF"):
        raise SystemExit(f"UNIMLM_CUDA must be AUTO, ON or OFF, got {os.environ['UNIMLM_CUDA']!r}")
    return value


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = os.environ.get("UNIMLM_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DUNIMLM_CUDA={cuda_option()}",
            f"-DUNIMLM_SANITIZE={'ON' if os.environ.get('UNIMLM_SANITIZE') == '1' else 'OFF'}",
        ]
        try:
            import ninja  # noqa: F401

            args += ["-G", "Ninja"]
        except ImportError:
            pass
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--target", "_C", "-j", jobs], check=True)


setup(
    name="unimlm-engine",
    version="0.1.0",
    description="Serving engine for generalist multimodal LLMs with routed task decoders",
    python_requires=">=3.10",
    packages=find_packages(include=["unimlm_engine", "unimlm_engine.*"])
    + ["unimlm_engine.export"],
    package_dir={
        "unimlm_engine": "unimlm_engine",
        "unimlm_engine.export": "export",
    },
    # the shipped shapes model (the `tiny` preset's weights, issue 18)
    package_data={"unimlm_engine": ["assets/shapes-tiny/*.json", "assets/shapes-tiny/*.safetensors"]},
    ext_modules=[CMakeExtension("unimlm_engine._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "pillow",
        "tokenizers",
        "safetensors",
        "sentencepiece",
        "tqdm",
        "pycocotools",
    ],
    extras_require={
        "triton": ["triton"],
        "decoders": ["diffusers", "transformers"],
        "export": ["onnx", "onnxruntime", "onnxscript"],
        "bench": ["matplotlib"],
        "train": ["scipy"],  # training/train_shapes.py (Hungarian matching)
        "serve": ["fastapi", "uvicorn", "prometheus_client", "httpx"],
        "ray": ["ray[serve]>=2.60", "fastapi", "uvicorn", "prometheus_client", "httpx"],
        "test": [
            "pytest",
            "pytest-timeout",
            "fastapi",
            "uvicorn",
            "prometheus_client",
            "httpx",
            "openai",
            "transformers",
            "diffusers",
            "onnx",
            "onnxruntime",
            "onnxscript",
            "triton",
            "matplotlib",
            "ray[serve]>=2.60",
            "scipy",  # tests/test_shapes_model.py: one training step of training/train_shapes.py
        ],
    },
    entry_points={"console_scripts": ["unimlm=unimlm_engine.cli.main:main"]},
)
