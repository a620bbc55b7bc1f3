"""A local stand-in for the Hugging Face Hub's HTTP API. This is a MOCK, the only one in the test suite.

The test machines cannot reach huggingface.co, and the Hub has no dry-run for uploads, so
tests/test_push.py points huggingface_hub at this server instead (HF_ENDPOINT, read once at
import: run the pushing code in a subprocess). It answers what huggingface_hub 2.4's
`create_repo`, `upload_folder` / `create_commit` (also the hf_xet "pipelined" uploader, which is
used whenever hf_xet is installed) and transformers' `Trainer.push_to_hub` ask for, and keeps
every pushed file in memory so that a test can check what arrived:

    POST /api/repos/create                            create (409 with the url if it exists)
    POST /api/validate-yaml                           README metadata check: always fine
    POST /api/{type}s/{ns}/{name}/preupload/{rev}     every file "regular" (base64 in the commit,
                                                      no LFS or Xet transfer), with the git oid
                                                      of the stored copy so unchanged files are skipped
    POST /api/{type}s/{ns}/{name}/commit/{rev}        NDJSON: header, file (base64), deletedFile,
                                                      deletedFolder; replies commitOid and a commitUrl
                                                      of the form {endpoint}/{repo}/commit/{oid}
    GET  /api/{type}s/{ns}/{name}[/revision/{rev}]    repo info: sha, siblings
    GET|HEAD /[{type}s/]{ns}/{name}/resolve/{rev}/{path}   the stored file, or 404 EntryNotFound
    GET  /api/whoami-v2                               a user named "user"
    GET  /api/agent-harnesses                         an empty registry (huggingface_hub's
                                                      best-effort check for AI coding agents)

Only the main branch exists. Anything else is answered 404 and listed in `unexpected`, so a
test can tell when a new library version starts asking for something this stand-in lacks.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

REPO_ID = r"([^/]+/[^/]+)"
TYPES = r"(model|dataset|space)s"


def git_blob_oid(data: bytes) -> str:
    """The oid git (and the Hub's preupload answer) gives a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    summary: str
    added: dict[str, bytes]
    deleted: list[str]


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool = False
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[Commit] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.commits[-1].oid if self.commits else "0" * 40


class HubStandIn:
    """`with HubStandIn() as hub:` serves on 127.0.0.1 at a free port; `hub.endpoint` is its URL."""

    def __init__(self):
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Authorization header
        self.unexpected: list[str] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="hub-standin", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- the API ------------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: str, body: bytes) -> tuple[int, dict, bytes]:
        if method == "GET" and path == "/api/whoami-v2":
            return _json(200, {"type": "user", "name": "user", "orgs": [], "auth": {"type": "access_token"}})
        if method == "GET" and path == "/api/agent-harnesses":
            return _json(200, {"standardEnvVars": [], "harnesses": {}})
        if method == "POST" and path == "/api/repos/create":
            return self._create(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return _json(200, {"errors": [], "warnings": []})
        if match := re.fullmatch(rf"/api/{TYPES}/{REPO_ID}/preupload/(.+)", path):
            return self._preupload(*match.groups(), json.loads(body), query) if method == "POST" else _not_found()
        if match := re.fullmatch(rf"/api/{TYPES}/{REPO_ID}/commit/(.+)", path):
            return self._commit(*match.groups(), body, query) if method == "POST" else _not_found()
        if method == "GET" and (match := re.fullmatch(rf"/api/{TYPES}/{REPO_ID}(?:/revision/(.+))?", path)):
            return self._info(*match.groups())
        if method in ("GET", "HEAD") and (
                match := re.fullmatch(rf"/(?:(dataset|space)s/)?{REPO_ID}/resolve/([^/]+)/(.+)", path)):
            return self._resolve(*match.groups())
        self.unexpected.append(f"{method} {path}")
        return _not_found()

    def _find(self, repo_type: str, repo_id: str, revision: str | None = "main") -> Repo | tuple:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            return _json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        if revision not in (None, "main", repo.sha):
            return _json(404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"})
        return repo

    def _create(self, payload: dict) -> tuple[int, dict, bytes]:
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        url = f"{self.endpoint}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                return _json(409, {"error": "You already created this model repo", "url": url})
            self.repos[(repo_type, repo_id)] = Repo(repo_id, repo_type, payload.get("visibility") == "private")
        return _json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _writable(self, repo_type, repo_id, revision, query) -> Repo | tuple:
        """The repo a preupload or commit writes to, or the error response."""
        repo = self._find(repo_type, repo_id, unquote(revision))
        if isinstance(repo, Repo) and "create_pr" in query:
            return _json(400, {"error": "the stand-in has no pull requests"})
        return repo

    def _preupload(self, repo_type, repo_id, revision, payload, query):
        repo = self._writable(repo_type, repo_id, revision, query)
        if not isinstance(repo, Repo):
            return repo
        files = [{"path": item["path"], "uploadMode": "regular", "shouldIgnore": False,
                  "oid": git_blob_oid(repo.files[item["path"]]) if item["path"] in repo.files else None}
                 for item in payload["files"]]
        return _json(200, {"files": files, "commitOid": repo.sha})

    def _commit(self, repo_type, repo_id, revision, body, query):
        repo = self._writable(repo_type, repo_id, revision, query)
        if not isinstance(repo, Repo):
            return repo
        summary, added, deleted = "", {}, []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value["summary"]
                if value.get("parentCommit") not in (None, repo.sha):
                    return _json(412, {"error": "parent commit is not the head of main"})
            elif key == "file":
                if value.get("encoding") != "base64":
                    return _json(400, {"error": f"unsupported encoding {value.get('encoding')}"})
                added[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:  # lfsFile, copies: the preupload answer never asks for them
                return _json(400, {"error": f"the stand-in only takes regular files, got {key}"})
        with self.lock:
            for path in deleted:
                for name in [name for name in repo.files if name == path or name.startswith(path.rstrip("/") + "/")]:
                    del repo.files[name]
            repo.files.update(added)
            digest = hashlib.sha1(repo.sha.encode() + summary.encode())
            for name in sorted(repo.files):
                digest.update(name.encode() + b"\0" + git_blob_oid(repo.files[name]).encode())
            commit = Commit(digest.hexdigest(), summary, added, deleted)
            repo.commits.append(commit)
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return _json(200, {"commitUrl": f"{self.endpoint}/{prefix}{repo_id}/commit/{commit.oid}",
                           "commitOid": commit.oid, "pullRequestUrl": None, "success": True})

    def _info(self, repo_type, repo_id, revision):
        repo = self._find(repo_type, repo_id, unquote(revision) if revision else None)
        if not isinstance(repo, Repo):
            return repo
        return _json(200, {"id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": repo.private,
                           "siblings": [{"rfilename": name} for name in sorted(repo.files)], "tags": [],
                           "downloads": 0, "likes": 0})

    def _resolve(self, type_prefix, repo_id, revision, filename):
        repo = self._find(type_prefix or "model", repo_id, unquote(revision))
        if not isinstance(repo, Repo):
            return repo
        data = repo.files.get(unquote(filename))
        if data is None:
            return _json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
        return 200, {"Content-Type": "application/octet-stream", "X-Repo-Commit": repo.sha,
                     "ETag": f'"{git_blob_oid(data)}"'}, data


def _json(status: int, payload: dict, headers: dict | None = None) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(payload).encode()


def _not_found() -> tuple[int, dict, bytes]:
    return _json(404, {"error": "not served by the Hub stand-in"})


def _handler(hub: HubStandIn):
    class Handler(BaseHTTPRequestHandler):
        def _serve(self):
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = b""
                while (size := int(self.rfile.readline().strip() or b"0", 16)) > 0:
                    body += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
            else:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            url = urlsplit(self.path)
            hub.requests.append((self.command, url.path, self.headers.get("Authorization")))
            try:
                status, headers, payload = hub.handle(self.command, url.path, url.query, body)
            except Exception as error:  # a bug in the stand-in: say so instead of hanging the client
                status, headers, payload = _json(500, {"error": f"hub stand-in: {error!r}"})
                hub.unexpected.append(f"{self.command} {url.path}: {error!r}")
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(payload))}.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _serve

        def log_message(self, *args):  # keep pytest output clean
            pass

    return Handler
