"""Build of the ckptio._native extension.

The plain-C core (src/core) and the binding (src/binding) are compiled into
one extension. What it links:

- libdeflate (inflate, CRC-32): by default from the system, through
  pkg-config (Debian: libdeflate-dev). With CKPTIO_DEPS_PREFIX=DIR it is
  linked statically from DIR/lib/libdeflate.a with headers from DIR/include
  (`make wheel` builds that prefix from Debian's pinned source package).
- libcurl and libcrypto: never linked; opened at run time (src/core/curlshim.c,
  src/core/sha256.c). The build needs libcurl's headers only (Debian:
  libcurl4-openssl-dev; or DIR/include/curl with CKPTIO_DEPS_PREFIX).
- NumPy's C API, compiled against NumPy >= 2 and targeting the 1.23 C API,
  so that one build runs under NumPy 1.x and 2.x.

Flags come from src/cflags.txt (shared with the Makefile); CKPTIO_WERROR=1
adds -Werror (CI), CKPTIO_SANITIZE=1 builds with ASan and UBSan (make asan).
"""
import glob
import os
import shlex
import subprocess

import numpy
from setuptools import Extension, setup


def read_flags(path="src/cflags.txt"):
    with open(path) as f:
        return [w for line in f for w in line.split("#", 1)[0].split()]


def pkg_config(*args):
    try:
        out = subprocess.check_output(["pkg-config", *args], text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(
            f"pkg-config {' '.join(args)} failed: a build from source needs a C compiler, "
            "pkg-config, libdeflate's and libcurl's headers (Debian/Ubuntu: apt install "
            "build-essential pkg-config libdeflate-dev libcurl4-openssl-dev; Fedora/RHEL: dnf "
            "install gcc pkgconf libdeflate-devel libcurl-devel), or CKPTIO_DEPS_PREFIX=DIR "
            "with DIR/lib/libdeflate.a and DIR/include (make wheel builds one)"
        ) from exc
    return shlex.split(out)


def deps():
    """(compile flags, include dirs, extra objects, link flags) for the libraries."""
    prefix = os.environ.get("CKPTIO_DEPS_PREFIX")
    if prefix:
        static = os.path.join(prefix, "lib", "libdeflate.a")
        if not os.path.exists(static):
            raise SystemExit(f"CKPTIO_DEPS_PREFIX={prefix}: {static} is missing")
        return [], [os.path.join(prefix, "include")], [static], []
    cflags = pkg_config("--cflags", "libdeflate", "libcurl")
    return cflags, [], [], pkg_config("--libs", "libdeflate")


def flags():
    extra = read_flags() + ["-fvisibility=hidden"]
    if os.environ.get("CKPTIO_WERROR") == "1":
        extra.append("-Werror")
    link = []
    if os.environ.get("CKPTIO_SANITIZE"):
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
               "-fno-sanitize-recover=undefined"]
        extra += san + ["-O1", "-g"]
        link += san
    return extra, link


cflags, link = flags()
dep_cflags, dep_includes, dep_objects, dep_libs = deps()
sources = sorted(glob.glob("src/core/*.c")) + sorted(glob.glob("src/binding/*.c"))

setup(
    ext_modules=[
        Extension(
            "ckptio._native",
            sources=sources,
            include_dirs=["src", numpy.get_include(), *dep_includes],
            define_macros=[
                ("NPY_NO_DEPRECATED_API", "NPY_1_21_API_VERSION"),
                ("NPY_TARGET_VERSION", "NPY_1_23_API_VERSION"),
            ],
            extra_compile_args=dep_cflags + cflags,
            extra_objects=dep_objects,
            # dlopen and threads live in libdl and libpthread on glibc < 2.34
            libraries=["dl", "pthread"],
            extra_link_args=dep_libs + link,
            depends=sorted(glob.glob("src/*/*.h")) + ["src/cflags.txt"],
        )
    ],
)
