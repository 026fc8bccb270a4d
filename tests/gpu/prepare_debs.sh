#!/usr/bin/env bash
# Fetches, here, the .deb files that tests/gpu/run_device.sh unpacks on the
# GPU machine (which reaches no registry): the -dev packages ckptio builds
# against, the shared libraries they need, and pkg-config.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .gpu/debs
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
cd .gpu/debs
runtime=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
  --no-replaces --no-enhances libzip4 libdeflate0 libcurl4 libssl3 | grep '^\w' | sort -u |
  grep -vE '^(libc6|libgcc-s1|gcc-12-base|debconf)$')
apt-get download $runtime libzip-dev libdeflate-dev libcurl4-openssl-dev libssl-dev zlib1g-dev \
  pkgconf pkgconf-bin libpkgconf3 pkg-config
