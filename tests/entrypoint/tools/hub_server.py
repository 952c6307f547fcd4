"""A real HTTP server speaking the part of the Hugging Face Hub API that
``huggingface_hub`` uses to download repos: repo info with file sizes, and HEAD/GET
of ``resolve`` URLs with ETags, commit headers and byte ranges (for resume).

It serves folders: ``<root>/<models|datasets>/<owner>/<name>/...``. Each repo's
commit is a hash of its files. ``cut_after`` makes the server drop the connection
after that many bytes of one file, once, to test resuming.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


def _files(repo: Path) -> list[Path]:
    return sorted(p for p in repo.rglob("*") if p.is_file())


def _commit(repo: Path) -> str:
    digest = hashlib.sha1()
    for path in _files(repo):
        digest.update(str(path.relative_to(repo)).encode())
        digest.update(hashlib.sha1(path.read_bytes()).digest())
    return digest.hexdigest()


class Hub:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.cut_after: dict[str, int] = {}  # file name -> bytes sent before the cut (once)
        self.reported_sizes: dict[str, int] = {}  # file name -> size the repo info claims
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "Hub":
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _repo(self, kind: str, repo_id: str) -> Path | None:
        repo = self.root / kind / repo_id
        return repo if repo.is_dir() else None

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _json(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self):
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path, self.headers.get("Range")))
                parts = path.strip("/").split("/")
                if parts[0] == "api" and (len(parts) == 4 or (len(parts) >= 6 and parts[4] == "revision")):
                    return ("info", parts[1], f"{parts[2]}/{parts[3]}", None)
                kind = "datasets" if parts[0] == "datasets" else "models"
                if kind == "datasets":
                    parts = parts[1:]
                if len(parts) >= 5 and parts[2] == "resolve":
                    return ("file", kind, f"{parts[0]}/{parts[1]}", "/".join(parts[4:]))
                return (None, None, None, None)

            def do_GET(self):
                self._serve(send_body=True)

            def do_HEAD(self):
                self._serve(send_body=False)

            def _serve(self, send_body: bool):
                what, kind, repo_id, filename = self._route()
                repo = hub._repo(kind, repo_id) if what else None
                if repo is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "RepoNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                commit = _commit(repo)
                if what == "info":
                    siblings = [
                        {
                            "rfilename": str(p.relative_to(repo)),
                            "size": hub.reported_sizes.get(p.name, p.stat().st_size),
                        }
                        for p in _files(repo)
                    ]
                    return self._json(200, {"id": repo_id, "sha": commit, "private": False, "siblings": siblings})
                target = repo / filename
                if not target.is_file():
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = target.read_bytes()
                start = 0
                ranged = self.headers.get("Range")
                if ranged and ranged.startswith("bytes="):
                    start = int(ranged[len("bytes=") :].split("-")[0])
                body = data[start:]
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(body)))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not send_body:
                    return
                cut = hub.cut_after.pop(target.name, None)
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # the transfer breaks off mid-file
                    return
                self.wfile.write(body)

        return Handler
