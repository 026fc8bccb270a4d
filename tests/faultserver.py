"""A threaded HTTP server on 127.0.0.1 (ephemeral port) that serves one file
with faults on demand, for the download tests and the HTTP benchmark.

Every request to the file consumes the next mode of `plan` (then `default`):

    ok           the file (206 for a Range request the server accepts)
    reset        headers for the whole answer, half its body, then a TCP reset
    short        headers for the whole answer, half its body, then a clean close
    slow         headers, 1 KiB of body, then nothing until the client gives up
    html         200, Content-Type text/html, an HTML error page
    html_body    200, Content-Type application/octet-stream, body "<!DOCTYPE html>..."
    bad_range    206 whose Content-Range starts one byte after what was asked
    redirect     302 to the same path with "?moved=1" (the next mode serves it)
    etag_change  the file becomes `next_payload` with a new ETag, then as ok
    same_date_change  the file becomes `next_payload` with a new ETag but the same
                 Last-Modified (a server that keeps the date), then as ok
    <number>     that HTTP status with a small text body (e.g. "404", "500", "429")

Range requests ("bytes=N-") are honoured when `ranges` is true and If-Range
(when sent) matches the current ETag or Last-Modified; otherwise the whole
file is sent with 200. `validators` false sends neither ETag nor
Last-Modified, `etags` false only Last-Modified; `etag` may be set to a weak
one (W/"..."). Each request is appended to `log` as a dict with the
method, path, Range, If-Range, mode and status.

Content comes from `payload` (bytes) or `path` (a file sent with
os.sendfile, for throughput).
"""
import os
import socket
import struct
import sys
import threading
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "faultserver"

    def log_message(self, fmt, *args):
        pass

    def do_GET(self):
        fs = self.server.owner
        with fs.lock:
            mode = fs.plan.pop(0) if fs.plan else fs.default
            if mode in ("etag_change", "same_date_change"):
                fs.version += 1
                fs.etag = '"v%d"' % fs.version
                if mode == "etag_change":
                    fs.last_modified = formatdate(1_600_000_000 + fs.version, usegmt=True)
                if fs.next_payload is not None:
                    fs.payload = fs.next_payload
                mode = "ok"
            entry = {
                "method": "GET",
                "path": self.path,
                "range": self.headers.get("Range"),
                "if_range": self.headers.get("If-Range"),
                "user_agent": self.headers.get("User-Agent"),
                "mode": mode,
                "status": None,
            }
            fs.log.append(entry)
            payload, etag, lm = fs.payload, fs.etag, fs.last_modified
        try:
            self._serve(fs, mode, entry, payload, etag, lm)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _status_only(self, entry, code, body, ctype="text/plain", extra=None):
        entry["status"] = code
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        if code in (429, 503):
            self.send_header("Retry-After", "0")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _serve(self, fs, mode, entry, payload, etag, lm):
        if mode.isdigit():
            self._status_only(entry, int(mode), "error %s\n" % mode)
            return
        if mode == "redirect":
            entry["status"] = 302
            self.send_response(302)
            sep = "&" if "?" in self.path else "?"
            self.send_header("Location", self.path + sep + "moved=1")
            self.send_header("Content-Length", "0")
            self.send_header("Connection", "close")
            self.end_headers()
            return
        if mode == "html":
            page = "<!DOCTYPE html><html><body>Sign in to continue</body></html>\n"
            self._status_only(entry, 200, page, "text/html; charset=utf-8")
            return
        size = fs.size(payload)
        start = 0
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if (
            fs.ranges
            and rng
            and rng.startswith("bytes=")
            and rng.endswith("-")
            and (if_range is None or if_range in (etag, lm))
        ):
            start = int(rng[6:-1])
            if start >= size:
                extra = {"Content-Range": "bytes */%d" % size}
                if fs.validators:
                    extra.update({"Last-Modified": lm})
                    if fs.etags:
                        extra["ETag"] = etag
                self._status_only(entry, 416, "range not satisfiable\n", extra=extra)
                return
        if mode == "bad_range" and start == 0:
            start = 1
        partial = start > 0
        entry["status"] = 206 if partial else 200
        self.send_response(entry["status"])
        ctype = "application/octet-stream"
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(size - start))
        if fs.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if fs.validators:
            if fs.etags:
                self.send_header("ETag", etag)
            self.send_header("Last-Modified", lm)
        if partial:
            real = start + 1 if mode == "bad_range" else start
            self.send_header("Content-Range", "bytes %d-%d/%d" % (real, size - 1, size))
        self.send_header("Connection", "close")
        self.end_headers()
        if mode == "html_body":
            body = b"<!DOCTYPE html>\n<html><body>not found</body></html>\n"
            self.wfile.write(body.ljust(size - start, b" ")[: size - start])
            return
        if mode in ("reset", "short"):
            self._send_range(fs, payload, start, start + (size - start) // 2)
            self.wfile.flush()
            if mode == "reset":
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            else:
                self.connection.shutdown(socket.SHUT_RDWR)
            self.connection.close()
            return
        if mode == "slow":
            self._send_range(fs, payload, start, min(size, start + 1024))
            self.wfile.flush()
            fs.body_started.set()
            fs.stop.wait(30)
            return
        self._send_range(fs, payload, start, size)

    def _send_range(self, fs, payload, start, end):
        if fs.path is None:
            self.wfile.write(payload[start:end])
            return
        self.wfile.flush()
        out = self.connection.fileno()
        with open(fs.path, "rb") as f:
            offset = start
            while offset < end:
                sent = os.sendfile(out, f.fileno(), offset, min(end - offset, 1 << 30))
                if sent == 0:
                    break
                offset += sent

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass


class FaultServer:
    """The server; use as a context manager. url(name) is the file's URL."""

    def __init__(self, payload=b"", path=None, ranges=True, validators=True, tls=None, etags=True):
        self.payload = payload
        self.next_payload = None
        self.path = path
        self.ranges = ranges
        self.validators = validators
        self.etags = etags  # False: Last-Modified only
        self.plan = []
        self.default = "ok"
        self.log = []
        self.version = 1
        self.etag = '"v1"'
        self.last_modified = formatdate(1_600_000_001, usegmt=True)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.body_started = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.httpd.handle_error = lambda request, address: None
        self.scheme = "http"
        if tls is not None:
            # tls = (certfile, keyfile): serve https
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def size(self, payload):
        return os.path.getsize(self.path) if self.path is not None else len(payload)

    @property
    def port(self):
        return self.httpd.server_address[1]

    def url(self, name="file.bin"):
        return "%s://127.0.0.1:%d/%s" % (self.scheme, self.port, name)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def main(argv=None):
    """python faultserver.py FILE: serves FILE without faults, prints the
    port on the first line of stdout, and stops when stdin closes (used by
    ckptio.bench.http, so the server does not share the client's GIL)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("file")
    args = parser.parse_args(argv)
    with FaultServer(path=args.file) as fs:
        print(fs.port, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
