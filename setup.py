"""Build hook: compile the native int4 kernels (hyperjax/kernels/native) with the system C++ compiler.

Every other piece of metadata is in pyproject.toml. A missing compiler or a failed compile does not fail the
install: hyperjax then runs its pure-JAX kernels and says so once when a model loads.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

NATIVE_DIR = Path("hyperjax", "kernels", "native")


class BuildPyWithNativeKernels(build_py):
    """build_py, then `hyperjax.kernels.native.build` into the package (the source tree for editable installs)."""

    def run(self) -> None:
        super().run()
        target = NATIVE_DIR if self.editable_mode else Path(self.build_lib) / NATIVE_DIR
        spec = importlib.util.spec_from_file_location("_hyperjax_native_build", NATIVE_DIR / "build.py")
        builder = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(builder)
        try:
            self.announce(f"built native kernels: {builder.build(target)}", level=2)
        except Exception as error:  # any failure leaves the pure-JAX kernels in charge
            self.warn(f"native kernels not built, hyperjax will use its pure-JAX kernels: {error}")


class PlatformDistribution(Distribution):
    """The wheel carries a compiled library, so it is tagged for this platform."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_py": BuildPyWithNativeKernels}, distclass=PlatformDistribution)
