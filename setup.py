"""Build of the compiled parts: the streaming sequence packer (csrc/packer.cpp).

Everything else about the package lives in pyproject.toml. The extension is named
``refteacher.engine.data._packer`` so that it lands inside engine/data/ in an editable install too.
"""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "refteacher.engine.data._packer",
        ["csrc/packer.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
