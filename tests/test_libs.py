"""The run-time libraries: libcurl and libcrypto are opened with dlopen, not
linked, so the extension (and a wheel) imports without them; the CA bundle
is found on Debian and RHEL-style layouts; SHA-256 has a portable backend."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from ckptio import _native

HERE = os.path.dirname(os.path.abspath(__file__))


def run_py(code, **env):
    """Runs code in a fresh interpreter (dlopen choices are per process)."""
    full = dict(os.environ, **env)
    out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("n", [0, 1, 55, 56, 63, 64, 65, 119, 120, 128, 4096, 1 << 20, 3000001])
def test_sha256_backends_agree_with_hashlib(n):
    data = os.urandom(n)
    want = hashlib.sha256(data).digest()
    assert _native.sha256(data) == want
    assert _native.sha256(data, builtin=True) == want


def test_libcrypto_is_found_here():
    assert _native.libraries()["sha256"].startswith("libcrypto.so")


def test_without_libcrypto_the_builtin_sha256_checks_downloads(tmp_path):
    sys.path.insert(0, HERE)
    from faultserver import FaultServer

    data = os.urandom(300_000)
    digest = hashlib.sha256(data).hexdigest()
    with FaultServer(data) as fs:
        out = run_py(
            "import json, ckptio._native as n\n"
            f"r = n.download({fs.url()!r}, {str(tmp_path / 'f')!r}, hash_prefix={digest[:12]!r})\n"
            "print(json.dumps([n.libraries()['sha256'], r['sha256']]))",
            CKPTIO_LIBCRYPTO="/nonexistent/libcrypto.so",
        )
    backend, got = json.loads(out)
    assert backend == "builtin" and got == digest


def test_without_libcurl_import_works_and_download_says_why(tmp_path):
    out = run_py(
        "import json, ckptio._native as n\n"
        "info = n.libraries()\n"
        "try:\n"
        f"    n.download('http://127.0.0.1:9/x', {str(tmp_path / 'f')!r})\n"
        "    err = None\n"
        "except n.DownloadError as e:\n"
        "    err = str(e)\n"
        "print(json.dumps([info['libcurl'], info['libcurl_error'], err]))",
        CKPTIO_LIBCURL="/nonexistent/libcurl.so.4",
    )
    curl, why, err = json.loads(out)
    assert curl is None and "CKPTIO_LIBCURL" in why
    assert "libcurl" in err and "CKPTIO_LIBCURL" in err
    assert not os.path.exists(tmp_path / "f")


def test_libcurl_is_the_systems():
    info = _native.libraries()
    assert info["libcurl"].startswith("libcurl")
    # this Debian libcurl's own default bundle exists: nothing is overridden
    assert info["ca_bundle"] is None


def _layout(root, path):
    full = root / path.lstrip("/")
    full.parent.mkdir(parents=True, exist_ok=True)
    full.write_text("-----BEGIN CERTIFICATE-----\n")
    return path


@pytest.mark.parametrize(
    "bundle",
    [
        "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu
        "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",  # RHEL >= 7, Fedora
        "/etc/pki/tls/certs/ca-bundle.crt",  # RHEL, CentOS
        "/etc/ssl/ca-bundle.pem",  # openSUSE
        "/etc/ssl/cert.pem",  # Alpine
    ],
)
def test_ca_bundle_found_on_each_layout(tmp_path, bundle):
    _layout(tmp_path, bundle)
    root = str(tmp_path)
    # a libcurl built for another distribution: its default is missing here
    assert _native.pick_ca(root, "/usr/local/share/curl/ca.pem", None) == bundle
    assert _native.pick_ca(root, None, None) == bundle
    # its own default exists: left alone
    own = _layout(tmp_path, "/opt/curl/ca.pem")
    assert _native.pick_ca(root, own, None) is None
    os.makedirs(tmp_path / "etc/own-certs")
    assert _native.pick_ca(root, None, "/etc/own-certs") is None


def test_no_bundle_anywhere(tmp_path):
    assert _native.pick_ca(str(tmp_path), "/etc/ssl/certs/ca-certificates.crt", None) is None


def test_extension_links_no_network_or_tls_library():
    """ldd of the extension: libcurl, libssl, libcrypto are not linked."""
    out = subprocess.run(["ldd", _native.__file__], capture_output=True, text=True).stdout
    for lib in ("libcurl", "libssl", "libcrypto", "libzip", "libz.so"):
        assert lib not in out, out
