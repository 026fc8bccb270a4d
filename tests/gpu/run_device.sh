#!/usr/bin/env bash
# GPU checks on a lent CUDA machine (the `device` tool): builds ckptio there
# against -dev packages carried as .deb files in .gpu/debs (the machine
# cannot reach a package registry; tests/gpu/prepare_debs.sh fetches them
# here), then runs the GPU checks. Output goes to stdout and $OUT.
set -uo pipefail
PFX=/tmp/ckpfx
mkdir -p "$PFX" /tmp/ckdeps
for f in .gpu/debs/*.deb; do dpkg -x "$f" "$PFX"; done
LIB=$PFX/usr/lib/x86_64-linux-gnu
# Only the shared libraries the machine lacks are taken from the .debs.
for so in "$LIB"/*.so.[0-9]*; do
  soname=$(basename "$so" | sed -E 's/(\.so\.[0-9]+).*/\1/')
  ldconfig -p | grep -q " $soname " || cp -P "$LIB/$soname"* /tmp/ckdeps/ 2>/dev/null
done
export PATH=$PFX/usr/bin:$PATH
export PKG_CONFIG_PATH=$LIB/pkgconfig:$PFX/usr/share/pkgconfig PKG_CONFIG_SYSROOT_DIR=$PFX
export LD_LIBRARY_PATH=/tmp/ckdeps:$PFX/lib/x86_64-linux-gnu
export LDFLAGS="-L$LIB -Wl,-rpath,/tmp/ckdeps"
python3 -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, torch.cuda.get_device_name(0))'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 setup.py -q build_ext --inplace 2>&1 | tail -20 || exit 1
ldd ckptio/_native*.so | grep -E "not found|zip|deflate|curl|crypto"
status=0
for check in tests/gpu/check_*.py; do
  echo "== $check"
  PYTHONUNBUFFERED=1 python3 "$check" || status=1
done
exit $status
