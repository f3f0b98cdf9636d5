"""An in-memory Hugging Face Hub for tests (stdlib only).

It speaks the subset of the Hub protocol that ``huggingface_hub`` (2.x, httpx2 based) uses to create a repository,
validate a model card, pre-upload and commit regular files, read repository info and download files, and that
timm's ``hf-hub:`` loader uses through ``hf_hub_download``. Every file is answered ``uploadMode: "regular"`` so its
content arrives base64-encoded inside the NDJSON commit body; a commit is parsed completely into a staging
snapshot before the branch is moved, so a failed commit changes nothing. Like the real Hub, weight files
(``*.safetensors``, ``*.bin``) are resolved as LFS files: ``/resolve`` answers ``302`` to a CDN on another origin
(a second listener) with ``X-Linked-Etag`` (sha256) and ``X-Linked-Size``, and the CDN serves the bytes.

Usage::

    with HubServer() as server:
        configure_client(monkeypatch, server, tmp_path)   # point huggingface_hub (and timm) at the server
        ...

Tokens map to users (``{"hf_test_token": "alice"}`` by default); a user may write to its own namespace and to the
organisations listed in ``orgs``. ``fail_next_commit`` injects a one-shot commit failure after part of the body was
read: ``"500"`` answers HTTP 500, ``"disconnect"`` drops the connection without an answer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

TEST_TOKEN = "hf_test_token"
TEST_USER = "alice"
LFS_SUFFIXES = (".safetensors", ".bin")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob, which the Hub uses as ETag and oid of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    summary: str
    parent: str | None
    files: dict[str, bytes]  # full snapshot after this commit
    changed: list[str]  # paths added or updated by this commit
    deleted: list[str]


@dataclass
class Repo:
    repo_id: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # "main", "refs/pr/1", ... -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)  # commit oids, oldest first
    pull_requests: int = 0

    def resolve(self, revision: str) -> Commit | None:
        oid = self.refs.get(revision, revision)
        return self.commits.get(oid)


class HubError(Exception):
    """An error answer: status, message, optional X-Error-Code, extra headers and extra JSON body fields."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.body = headers or {}, body or {}


class _Disconnect(Exception):
    """Drop the connection without answering."""


class HubServer:
    """A threaded HTTP server holding model repositories in memory."""

    def __init__(self, tokens: dict[str, str] | None = None, orgs: dict[str, set[str]] | None = None):
        self.tokens = dict(tokens if tokens is not None else {TEST_TOKEN: TEST_USER})
        self.orgs = {user: set(names) for user, names in (orgs or {}).items()}
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.fail_next_commit: str | None = None
        self._lock = threading.Lock()
        self._counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._cdn: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return _base_url(self._httpd)

    @property
    def cdn_url(self) -> str:
        return _base_url(self._cdn)

    def start(self) -> HubServer:
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._cdn = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        for httpd in (self._httpd, self._cdn):
            httpd.daemon_threads = True
            thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for httpd in (self._httpd, self._cdn):
            if httpd is not None:
                httpd.shutdown()
                httpd.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._httpd = self._cdn = None
        self._threads = []

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state helpers for tests -----------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, *, private: bool = False, files: dict[str, bytes] | None = None) -> Repo:
        """Create a repository with an initial commit (``.gitattributes`` plus ``files``)."""
        with self._lock:
            return self._create(repo_id, private, files or {})

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self._lock:
            return dict(self.repos[repo_id].resolve(revision).files)

    def commits(self, repo_id: str) -> list[Commit]:
        with self._lock:
            repo = self.repos[repo_id]
            return [repo.commits[oid] for oid in repo.history]

    # -- model -----------------------------------------------------------------------------------------------------

    def lfs_blob(self, sha256: str) -> bytes | None:
        with self._lock:
            for repo in self.repos.values():
                for commit in repo.commits.values():
                    for path, data in commit.files.items():
                        if path.endswith(LFS_SUFFIXES) and hashlib.sha256(data).hexdigest() == sha256:
                            return data
        return None

    def _new_oid(self, seed: str) -> str:
        self._counter += 1
        return hashlib.sha1(f"{seed}:{self._counter}".encode()).hexdigest()

    def _create(self, repo_id: str, private: bool, files: dict[str, bytes]) -> Repo:
        repo = Repo(repo_id=repo_id, private=private)
        snapshot = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", **files}
        oid = self._new_oid(repo_id)
        repo.commits[oid] = Commit(oid, "initial commit", None, snapshot, sorted(snapshot), [])
        repo.history.append(oid)
        repo.refs["main"] = oid
        self.repos[repo_id] = repo
        return repo

    def user_for(self, authorization: str | None) -> str | None:
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        user = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def can_write(self, user: str | None, namespace: str) -> bool:
        return user is not None and (namespace == user or namespace in self.orgs.get(user, set()))

    def readable_repo(self, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self.can_write(user, repo_id.split("/")[0])):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubServer

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # -- plumbing --------------------------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        parts = [unquote(p) for p in split.path.strip("/").split("/")] if split.path.strip("/") else []
        self.hub.requests.append((method, split.path))
        self._body_left: int | None = None  # None: the request body has not been read yet
        try:
            self.user = self.hub.user_for(self.headers.get("Authorization"))
            self._route(method, parts)
        except HubError as err:
            self._drain()
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._json(err.status, {"error": err.message, **err.body}, headers, head=method == "HEAD")
        except _Disconnect:
            self.close_connection = True

    def _route(self, method: str, parts: list[str]) -> None:
        if method == "POST" and parts == ["api", "repos", "create"]:
            return self._create_repo()
        if method == "POST" and parts == ["api", "validate-yaml"]:
            return self._validate_yaml()
        if method == "GET" and parts == ["api", "whoami-v2"]:
            if self.user is None:
                raise HubError(401, "Invalid username or password.")
            return self._json(200, {"type": "user", "name": self.user, "orgs": [
                {"name": o} for o in sorted(self.hub.orgs.get(self.user, ()))]})
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            if method == "GET" and not rest:
                return self._repo_info(repo_id, "main")
            if method == "GET" and len(rest) >= 2 and rest[0] == "revision":
                return self._repo_info(repo_id, "/".join(rest[1:]))
            if method == "POST" and len(rest) >= 2 and rest[0] == "preupload":
                return self._preupload(repo_id, "/".join(rest[1:]))
            if method == "POST" and len(rest) >= 2 and rest[0] == "commit":
                return self._commit(repo_id, "/".join(rest[1:]))
        if self.server is self.hub._cdn:
            if method in ("GET", "HEAD") and len(parts) == 2 and parts[0] == "lfs-cdn":
                return self._cdn_blob(parts[1], head=method == "HEAD")
            raise HubError(404, "Not found on the CDN")
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), head=method == "HEAD")
        if method in ("GET", "HEAD") and not parts:
            return self._json(200, {"hub": "test"}, head=method == "HEAD")
        raise HubError(404, f"Not found: {method} {self.path}")

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        self._body_left = 0
        return self.rfile.read(length) if length else b""

    def _drain(self) -> None:
        left = self._body_left
        if left is None:
            left = int(self.headers.get("Content-Length") or 0)
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                break
            left -= len(chunk)
        self._body_left = 0

    def _json_body(self) -> Any:
        try:
            return json.loads(self._read_body() or b"{}")
        except json.JSONDecodeError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err

    def _send(self, status: int, body: bytes, headers: dict[str, str], head: bool = False) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None, head: bool = False) -> None:
        body = json.dumps(obj).encode()
        self._send(status, body, {"Content-Type": "application/json", **(headers or {})}, head)

    def _writable(self, repo_id: str, read_is_enough: bool = False) -> Repo:
        repo = self.hub.readable_repo(repo_id, self.user)
        if self.user is None:
            raise HubError(401, "You must be authenticated to write to this repository")
        if not read_is_enough and not self.hub.can_write(self.user, repo_id.split("/")[0]):
            raise HubError(403, f"You don't have the rights to create a commit in {repo_id}")
        return repo

    # -- endpoints -------------------------------------------------------------------------------------------------

    def _create_repo(self) -> None:
        payload = self._json_body()
        if payload.get("type") not in (None, "model"):
            raise HubError(400, "This test server only hosts model repositories")
        if self.user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        namespace = payload.get("organization") or self.user
        repo_id = f"{namespace}/{payload.get('name')}"
        if not self.hub.can_write(self.user, namespace):
            raise HubError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        with self.hub._lock:
            if repo_id in self.hub.repos:
                # the client reads "url" from this answer when called with exist_ok=True
                raise HubError(409, "You already created this model repo", body={"url": f"{self.hub.url}/{repo_id}"})
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            self.hub._create(repo_id, private, {})
        self._json(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _validate_yaml(self) -> None:
        content = str(self._json_body().get("content", ""))
        lines = content.splitlines()
        if lines and lines[0].strip() == "---" and "---" not in (line.strip() for line in lines[1:]):
            return self._json(400, {"errors": [{"message": "YAML metadata block is not closed"}], "warnings": []})
        self._json(200, {"errors": [], "warnings": []})

    def _repo_info(self, repo_id: str, revision: str) -> None:
        repo = self.hub.readable_repo(repo_id, self.user)
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        self._json(200, {
            "id": repo_id, "modelId": repo_id, "private": repo.private, "sha": commit.oid,
            "siblings": [{"rfilename": name} for name in sorted(commit.files)],
        })

    def _preupload(self, repo_id: str, revision: str) -> None:
        create_pr = self.query.get("create_pr") == ["1"]
        repo = self._writable(repo_id, read_is_enough=create_pr)
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        files = self._json_body().get("files", [])
        answer = []
        for item in files:
            existing = commit.files.get(item["path"])
            answer.append({
                "path": item["path"], "uploadMode": "regular", "shouldIgnore": False,
                "oid": git_blob_sha1(existing) if existing is not None else None,
            })
        self._json(200, {"files": answer, "commitOid": commit.oid})

    def _commit(self, repo_id: str, revision: str) -> None:
        create_pr = self.query.get("create_pr") == ["1"]
        repo = self._writable(repo_id, read_is_enough=create_pr)
        with self.hub._lock:
            base = repo.resolve(revision)
            if base is None or (revision not in repo.refs and not create_pr):
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        fault, self.hub.fail_next_commit = self.hub.fail_next_commit, None
        body = self._read_commit_body(fault)
        staging = dict(base.files)
        changed: list[str] = []
        deleted: list[str] = []
        header: dict[str, Any] = {}
        for number, line in enumerate(body.splitlines()):
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                path = _clean_path(value.get("path", ""))
                if value.get("encoding") != "base64":
                    raise HubError(400, f"Unsupported encoding for {path}")
                staging[path] = base64.b64decode(value["content"], validate=True)
                changed.append(path)
            elif key in ("deletedFile", "deletedFolder"):
                path = _clean_path(value.get("path", "")).rstrip("/")
                removed = [p for p in staging if p == path or (key == "deletedFolder" and p.startswith(path + "/"))]
                if not removed:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                for p in removed:
                    del staging[p]
                deleted.extend(removed)
            else:
                raise HubError(400, f"Unsupported commit operation {key!r} (this server takes regular files only)")
            if fault == "500" and number >= 1:  # the header and a first operation were processed
                raise HubError(500, "Internal Error - injected failure in the middle of the commit")
        if not header.get("summary"):
            raise HubError(400, "Commit summary is required")
        with self.hub._lock:
            head = repo.resolve(revision)
            if header.get("parentCommit") and not head.oid.startswith(header["parentCommit"]):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            oid = self.hub._new_oid(repo_id)
            repo.commits[oid] = Commit(oid, header["summary"], head.oid, staging, changed, deleted)
            repo.history.append(oid)
            pr_url = None
            if create_pr:
                repo.pull_requests += 1
                repo.refs[f"refs/pr/{repo.pull_requests}"] = oid
                pr_url = f"{self.hub.url}/{repo_id}/discussions/{repo.pull_requests}"
            else:
                repo.refs[revision] = oid
        self._json(200, {
            "success": True, "commitOid": oid, "commitUrl": f"{self.hub.url}/{repo_id}/commit/{oid}",
            "pullRequestUrl": pr_url, "hookOutput": "",
        })

    def _read_commit_body(self, fault: str | None) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if fault == "disconnect":
            self.rfile.read(length // 2)
            raise _Disconnect()
        self._body_left = 0
        return self.rfile.read(length)

    def _resolve(self, repo_id: str, revision: str, path: str, head: bool) -> None:
        repo = self.hub.readable_repo(repo_id, self.user)
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        data = commit.files.get(path)
        if data is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        if path.endswith(LFS_SUFFIXES):
            sha256 = hashlib.sha256(data).hexdigest()
            return self._send(302, b"", {
                "Location": f"{self.hub.cdn_url}/lfs-cdn/{sha256}",
                "ETag": f'"{git_blob_sha1(data)}"',
                "X-Linked-Etag": f'"{sha256}"',
                "X-Linked-Size": str(len(data)),
                "X-Repo-Commit": commit.oid,
            }, head=head)
        self._send(200, data, {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_sha1(data)}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "none",
        }, head=head)


    def _cdn_blob(self, sha256: str, head: bool) -> None:
        if self.headers.get("Authorization"):
            raise HubError(400, "The CDN must not receive Hub credentials")
        data = self.hub.lfs_blob(sha256)
        if data is None:
            raise HubError(404, "No such blob")
        self._send(200, data, {"Content-Type": "application/octet-stream", "ETag": f'"{sha256}"'}, head=head)


def _base_url(httpd: ThreadingHTTPServer | None) -> str:
    if httpd is None:
        raise RuntimeError("server not started")
    host, port = httpd.server_address[:2]
    return f"http://{host}:{port}"


def _clean_path(path: str) -> str:
    if not path or path.startswith("/") or ".." in path.split("/"):
        raise HubError(400, f"Invalid path in repository: {path!r}")
    return path


def configure_client(monkeypatch: Any, server: HubServer, tmp_path: Path) -> None:
    """Point huggingface_hub, and timm's ``hf-hub:`` loader through it, at ``server`` with a private cache.

    ``huggingface_hub.constants`` reads ``HF_ENDPOINT`` and friends once at import, so the module attributes that
    the client reads at call time are patched as well as the environment. No token is configured: pass one
    explicitly or set ``HF_TOKEN``.
    """
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    for name, value in {
        "ENDPOINT": server.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_PROGRESS_BARS": True,
    }.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
