"""Build of the ckptio._native extension.

Compiler and linker flags for the C libraries come from pkg-config, so the
build follows whatever the system's -dev packages provide. The plain-C core
(src/core) and the binding (src/binding) are compiled into one extension.
"""
import glob
import os
import shlex
import subprocess

import numpy
from setuptools import Extension, setup

# libcrypto (OpenSSL): SHA-256 of downloads in C during the transfer, with the GIL
# released, at hashlib's speed (SHA-NI/AVX2 code paths).
PKGS = ["libzip", "zlib", "libcurl", "libdeflate", "libcrypto"]


def pkg_config(*args):
    try:
        out = subprocess.check_output(["pkg-config", *args, *PKGS], text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(
            "pkg-config could not find " + ", ".join(PKGS) + ": install pkg-config, "
            "libzip-dev, zlib1g-dev, libcurl4-openssl-dev, libdeflate-dev and libssl-dev (see README)"
        ) from exc
    return shlex.split(out)


def flags():
    cflags = pkg_config("--cflags")
    libs = pkg_config("--libs")
    extra = [
        "-std=gnu11",
        # every source sees the same libc: O_TMPFILE, sync_file_range, memmem (never per file)
        "-D_GNU_SOURCE",
        "-O2",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-Wno-missing-field-initializers",
        "-fvisibility=hidden",
    ]
    # CKPTIO_SANITIZE=1 builds with AddressSanitizer and UBSan (make asan).
    link = []
    if os.environ.get("CKPTIO_SANITIZE"):
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
        extra += san + ["-O1", "-g"]
        link += san
    return cflags + extra, libs + link


cflags, ldflags = flags()
sources = sorted(glob.glob("src/core/*.c")) + sorted(glob.glob("src/binding/*.c"))

setup(
    ext_modules=[
        Extension(
            "ckptio._native",
            sources=sources,
            include_dirs=["src", numpy.get_include()],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_21_API_VERSION")],
            extra_compile_args=cflags,
            extra_link_args=ldflags,
            depends=sorted(glob.glob("src/*/*.h")),
        )
    ],
)
