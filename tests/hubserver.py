"""A hub-compatible HTTP server on 127.0.0.1 for tests (``HF_ENDPOINT``).

It answers what ``hf_hub_download`` asks -- ``HEAD``/``GET /{repo}/resolve/{revision}/{file}`` with
``X-Repo-Commit``, ``ETag`` (the sha256, like an LFS file) and ``Content-Length``, ranged ``GET``
(``bytes=a-b``, ``bytes=a-``: 206 with ``Content-Range``) for resumes and partial reads, and the hub's ``X-Error-Code`` values for missing repos, revisions, files and gated repos --
and counts the bytes it serves per file. Fault switches make it misbehave on purpose.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str
    gated: bool = False
    branches: dict[str, str] = field(default_factory=dict)


@dataclass
class Faults:
    """Per-file misbehaviour. Counters count down on each GET of that file."""

    drop_after: dict[str, int] = field(default_factory=dict)  # close the connection after N body bytes
    drop_times: dict[str, int] = field(default_factory=dict)  # ... this many times
    errors_5xx: dict[str, int] = field(default_factory=dict)  # answer 503 this many times (HEAD and GET)
    wrong_bytes: dict[str, int] = field(default_factory=dict)  # serve corrupted bytes this many times
    short_body: dict[str, int] = field(default_factory=dict)  # send fewer bytes than Content-Length, N times
    stall_s: dict[str, float] = field(default_factory=dict)  # sleep this long before answering ...
    stall_times: dict[str, int] = field(default_factory=dict)  # ... this many times
    ignore_range: set[str] = field(default_factory=set)  # answer a ranged GET with 200 and the whole file
    short_range: dict[str, int] = field(default_factory=dict)  # send half of a requested range, N times
    wrong_range: set[str] = field(default_factory=set)  # answer a range with the bytes one offset later


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.served: Counter[str] = Counter()  # "repo/file" -> body bytes sent
        self.requests: list[tuple[str, str]] = []
        self.faults = Faults()
        self.token = "hf_test_token"
        self._server: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, gated: bool = False) -> str:
        commit = hashlib.sha1(repo_id.encode() + "".join(sorted(files)).encode()).hexdigest()
        self.repos[repo_id] = Repo(dict(files), commit, gated, {"main": commit})
        return commit

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def bytes_served(self, repo_id: str, filename: str) -> int:
        return self.served[f"{repo_id}/{filename}"]

    # -- request handling ----------------------------------------------------------------------------
    def _error(self, h: BaseHTTPRequestHandler, status: int, code: str | None, commit: str | None = None) -> None:
        h.send_response(status)
        if code:
            h.send_header("X-Error-Code", code)
            h.send_header("X-Error-Message", code)
        if commit:
            h.send_header("X-Repo-Commit", commit)
        h.send_header("Content-Length", "0")
        h.end_headers()

    def _take(self, table: dict[str, int], key: str) -> bool:
        with self._lock:
            if table.get(key, 0) > 0:
                table[key] -= 1
                return True
            return False

    def _handle(self, h: BaseHTTPRequestHandler, *, head: bool) -> None:
        path = unquote(h.path.split("?")[0]).lstrip("/")
        self.requests.append(("HEAD" if head else "GET", path))
        parts = path.split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(h, 404, None)
        repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        key = f"{repo_id}/{filename}"
        if key in self.faults.stall_s and self._take(self.faults.stall_times, key):
            time.sleep(self.faults.stall_s[key])
        if self._take(self.faults.errors_5xx, key):
            return self._error(h, 503, None)
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 401, "RepoNotFound")
        if repo.gated and h.headers.get("Authorization") != f"Bearer {self.token}":
            return self._error(h, 401, "GatedRepo")
        commit = repo.branches.get(revision) or (revision if revision == repo.commit else None)
        if commit is None:
            return self._error(h, 404, "RevisionNotFound")
        data = repo.files.get(filename)
        if data is None:
            return self._error(h, 404, "EntryNotFound", commit)
        start, end = 0, len(data)  # [start, end)
        rng = h.headers.get("Range")
        ranged = bool(rng and rng.startswith("bytes=") and not head and key not in self.faults.ignore_range)
        if ranged:
            first, _, last = rng[len("bytes=") :].partition("-")
            start = int(first or 0)
            end = min(int(last) + 1, len(data)) if last else len(data)
            if start >= len(data):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            if key in self.faults.wrong_range:
                start, end = start + 1, min(end + 1, len(data))
        body = data[start:end]
        h.send_response(206 if ranged else 200)
        h.send_header("X-Repo-Commit", commit)
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("Content-Length", str(len(body)))
        if ranged:
            h.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        h.send_header("Accept-Ranges", "bytes")
        h.end_headers()
        if head:
            return
        if self._take(self.faults.wrong_bytes, key):
            body = bytes(b ^ 0x5A for b in body[:64]) + body[64:]
        if self._take(self.faults.short_body, key) or (ranged and self._take(self.faults.short_range, key)):
            body = body[: len(body) // 2]
            h.close_connection = True
        limit = self.faults.drop_after.get(key)
        if limit is not None and self._take(self.faults.drop_times, key):
            body = body[:limit]
            h.close_connection = True
        try:
            for i in range(0, len(body), 1 << 20):
                h.wfile.write(body[i : i + (1 << 20)])
                with self._lock:
                    self.served[key] += len(body[i : i + (1 << 20)])
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
