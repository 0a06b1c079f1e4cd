"""A tiny in-memory OCI distribution registry (plain HTTP, no auth) for the
tests: just enough of the registry v2 API for podman to push an image and
pull it back (blob uploads, chunked or not; manifests by tag and digest).
No registry is reachable from these machines, so the image-sharing path
is tested against this one, with the real engine on the other side.

    server, store = serve()     # 127.0.0.1:<free port>, a daemon thread
    store.log                   # "METHOD path" of every request
    server.shutdown()
"""

from __future__ import annotations

import hashlib
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Store:
    def __init__(self):
        self.blobs, self.manifests, self.log = {}, {}, []
        self.uploads: dict[str, bytearray] = {}


def handler_for(store: Store):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return bytes(data)
                    data += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _reply(self, code, body=b"", headers=None):
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Docker-Distribution-API-Version", "registry/2.0")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _route(self):
            store.log.append(f"{self.command} {self.path}")
            path, _, query = self.path.partition("?")
            params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
            if path == "/v2/" or path == "/v2":
                return self._reply(200, b"{}", {"Content-Type": "application/json"})
            m = re.fullmatch(r"/v2/(.+)/blobs/uploads/?([^/]*)", path)
            if m:
                name, upload = m.groups()
                if self.command == "POST":
                    upload = uuid.uuid4().hex
                    store.uploads[upload] = bytearray(self._body())
                    if "digest" in params:
                        return self._finish(name, upload, params["digest"])
                    return self._reply(202, headers={
                        "Location": f"/v2/{name}/blobs/uploads/{upload}",
                        "Docker-Upload-UUID": upload, "Range": "0-0"})
                if self.command == "PATCH":
                    store.uploads[upload] += self._body()
                    return self._reply(202, headers={
                        "Location": f"/v2/{name}/blobs/uploads/{upload}",
                        "Docker-Upload-UUID": upload,
                        "Range": f"0-{max(0, len(store.uploads[upload]) - 1)}"})
                if self.command == "PUT":
                    store.uploads[upload] += self._body()
                    return self._finish(name, upload, params["digest"].replace("%3A", ":"))
            m = re.fullmatch(r"/v2/(.+)/blobs/(sha256:[0-9a-f]+)", path)
            if m:
                blob = store.blobs.get(m.group(2))
                if blob is None:
                    return self._reply(404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}',
                                       {"Content-Type": "application/json"})
                return self._reply(200, blob, {"Docker-Content-Digest": m.group(2),
                                               "Content-Type": "application/octet-stream"})
            m = re.fullmatch(r"/v2/(.+)/manifests/([^/]+)", path)
            if m:
                key = (m.group(1), m.group(2))
                if self.command == "PUT":
                    body = self._body()
                    digest = "sha256:" + hashlib.sha256(body).hexdigest()
                    kind = self.headers.get("Content-Type")
                    store.manifests[key] = store.manifests[(key[0], digest)] = (body, kind)
                    return self._reply(201, headers={"Docker-Content-Digest": digest,
                                                     "Location": f"/v2/{key[0]}/manifests/{digest}"})
                found = store.manifests.get(key)
                if found is None:
                    return self._reply(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}',
                                       {"Content-Type": "application/json"})
                body, kind = found
                return self._reply(200, body, {"Content-Type": kind, "Docker-Content-Digest":
                                               "sha256:" + hashlib.sha256(body).hexdigest()})
            return self._reply(404)

        def _finish(self, name, upload, digest):
            data = bytes(store.uploads.pop(upload))
            if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
                return self._reply(400, b'{"errors":[{"code":"DIGEST_INVALID"}]}')
            store.blobs[digest] = data
            return self._reply(201, headers={"Location": f"/v2/{name}/blobs/{digest}",
                                             "Docker-Content-Digest": digest})

        do_GET = do_HEAD = do_POST = do_PATCH = do_PUT = _route

    return Handler


def serve():
    store = Store()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(store))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, store
