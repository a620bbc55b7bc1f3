"""A bound on what gradio's upload folder holds for this app, and uploads deleted once used.

gradio stores every upload (`POST /gradio_api/upload`) in its folder and deletes it only with the
hourly `delete_cache` sweep; its size limit is per file, and several files may come in one request.
Here (`UploadLimits`):
- an upload request's body may be at most `max_request_bytes`: a larger Content-Length is refused
  before anything is read, a body sent without one is cut off there;
- the uploads that no request has used up yet hold at most `max_bytes` and `max_files` together;
  beyond that the route answers 503, saying to retry in a minute;
- an upload is deleted as soon as the last request naming it is done, answered or refused
  (`UploadLedger.release`); one that no request uses is deleted `unused_ttl_s` after it arrived, at
  an upload at most `sweep_every_s` later, as is a partial file that a dropped upload left behind.
The examples and the images the page shows (previews, heatmaps) are not uploads: gradio's
`delete_cache` ages those. The same middleware (`RequestGuard`) bounds every other request body, so that
no client string of unbounded size reaches gradio's replies or the log; `unknown_endpoint` answers a
call to an endpoint the app does not have.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import ClientDisconnect
from starlette.responses import PlainTextResponse

UPLOAD_ROUTE = "/gradio_api/upload"
# Any other request of this app's (joining the queue with an uploaded file's path, a heartbeat) is well
# under 2 KB; twice the longest path Linux accepts.
MAX_OTHER_BODY = 8 * 1024
MULTIPART_ENVELOPE = 64 * 1024  # an upload request's bytes around its file: boundaries, part headers
ENDPOINT_ROUTES = ("/queue/join", "/run/", "/call/", "/api/")  # gradio's routes that name an endpoint
ECHO_LIMIT = 200  # characters of a client-supplied string (a path, a name) that go into a log line

log = logging.getLogger("pneumonia_vit.serving.uploads")


def shortened(text: str, limit: int = ECHO_LIMIT) -> str:
    """`text` cut to `limit` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


@dataclass(frozen=True)
class UploadLimits:
    # gradio's cap on one file (launch's max_file_size). An upload request carries one file (gradio_client
    # sends each file of a list on its own; the page takes one).
    max_file_bytes: int
    # Room for a spike of several hundred clients at once, each with its own file (uploads come before the queue
    # can say "busy"; benchmarks/crowd.py sends 300); 2 GiB is 4% of a free Space's 50 GB disk.
    max_files: int = 1024
    max_bytes: int = 2 * 2**30
    # Far above the longest wait in a full queue; an upload no request has used by then is abandoned.
    unused_ttl_s: float = 600.0
    # The folder holds gradio's previews and examples too (thousands): a scan per upload cost more than the upload.
    sweep_every_s: float = 10.0

    @property
    def max_request_bytes(self) -> int:
        return self.max_file_bytes + MULTIPART_ENVELOPE


@dataclass
class _Upload:
    size: int
    holders: int  # upload requests that returned this path and whose request has not released it yet
    arrived: float  # time.monotonic() of the latest upload of it
    inode: int  # of the file the latest upload of it left (each upload renames a new file onto the path)


class UploadLedger:
    """The uploads this app has received and not yet deleted, by path (gradio names an upload by a
    salted hash of its content, so the same file uploaded twice is one path with two holders)."""

    def __init__(self, folder: str | Path, limits: UploadLimits, keep: frozenset[str] = frozenset(), forget=None):
        self.folder = Path(folder).resolve()
        self.limits = limits
        # Files that are not only uploads (the examples' copies): an upload of the same bytes gets the
        # same path, and must not delete them.
        self.keep = keep
        self.forget = forget  # called with each deleted path: gradio's own lists of files to age
        self.uploads: dict[str, _Upload] = {}
        self.reserved = [0, 0]  # files and bytes of uploads being received
        self.swept = float("-inf")
        self.lock = threading.Lock()

    def holds(self, path: str | Path) -> bool:
        return str(path) in self.uploads

    def admit(self, declared_bytes: int) -> str | None:
        """Reserve room for an upload of `declared_bytes`; the refusal's text if there is none."""
        if time.monotonic() - self.swept > self.limits.sweep_every_s:
            self.swept = time.monotonic()
            self.sweep()
        with self.lock:
            files = len(self.uploads) + self.reserved[0]
            held = sum(upload.size for upload in self.uploads.values()) + self.reserved[1]
            if files < self.limits.max_files and held + declared_bytes <= self.limits.max_bytes:
                self.reserved[0] += 1
                self.reserved[1] += declared_bytes
                return None
        log.warning("upload refused: the upload folder holds %d files, %.0f MB", files, held / 2**20)
        return ("The server's upload space is full (too many uploads waiting to be analysed): "
                "retry in a minute.")

    def received(self, declared_bytes: int, paths: list[str]) -> None:
        """The upload route answered: `paths` now hold what was reserved."""
        now = time.monotonic()
        with self.lock:
            self.reserved[0] -= 1
            self.reserved[1] -= declared_bytes
            for path in paths:
                if path in self.keep:
                    continue
                try:
                    stat = os.stat(path)
                except OSError:
                    continue
                upload = self.uploads.setdefault(path, _Upload(stat.st_size, 0, now, stat.st_ino))
                upload.holders += 1
                upload.arrived, upload.inode = now, stat.st_ino

    def release(self, path: str) -> None:
        """A request that named `path` is done: delete the upload once no other request holds it."""
        with self.lock:
            upload = self.uploads.get(path)
            if upload is None:
                return
            upload.holders -= 1
            if upload.holders > 0:
                return
            del self.uploads[path]
            try:
                # Another upload of the same bytes, not yet recorded, has replaced the file: it is its file now.
                if os.stat(path).st_ino != upload.inode:
                    return
            except OSError:
                return
        self._delete(path)

    def sweep(self) -> None:
        """Delete the uploads no request used within `unused_ttl_s`, and partial files of dropped uploads."""
        now = time.monotonic()
        with self.lock:
            expired = [path for path, upload in self.uploads.items() if now - upload.arrived > self.limits.unused_ttl_s]
            for path in expired:
                del self.uploads[path]
        for path in expired:
            self._delete(path)
        # gradio receives an upload into a temporary file in the folder's top level, then moves it into
        # a sub-folder; one left there and untouched for `unused_ttl_s` belongs to a dropped upload.
        cutoff = time.time() - self.limits.unused_ttl_s
        try:
            with os.scandir(self.folder) as entries:
                stale = [entry.path for entry in entries
                         if entry.name.startswith("tmp") and entry.is_file() and entry.stat().st_mtime < cutoff]
        except OSError:
            return
        for path in stale:
            self._delete(path)

    def _delete(self, path: str) -> None:
        try:
            os.unlink(path)
            os.rmdir(os.path.dirname(path))  # gradio's per-upload folder, if now empty
        except OSError:
            pass
        if self.forget is not None:
            self.forget(path)


def releasing(fn, ledger: UploadLedger, validator: bool = False):
    """`fn` (an event function or its validator) that releases its upload arguments when done: always
    for an event function; for a validator, when it refuses (its event function then never runs)."""

    def done(args, refused: bool) -> None:
        if validator and not refused:
            return
        for value in args:
            for path in value if isinstance(value, list) else [value]:
                if isinstance(path, str) and ledger.holds(path):
                    ledger.release(path)

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def wrapper(*args, **kwargs):
            try:
                result = await fn(*args, **kwargs)
            except BaseException:
                done(args, refused=True)
                raise
            done(args, refused=_refuses(result))
            return result
    else:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                result = fn(*args, **kwargs)
            except BaseException:
                done(args, refused=True)
                raise
            done(args, refused=_refuses(result))
            return result
    return wrapper


def _refuses(validation) -> bool:
    """Whether a validator's answer (gr.validate(...), one or a list of them) refuses the request."""
    answers = validation if isinstance(validation, (list, tuple)) else [validation]
    return any(isinstance(answer, dict) and answer.get("is_valid") is False for answer in answers)


class RequestGuard:
    """ASGI middleware in front of gradio's routes: request bodies are bounded (an upload by
    `UploadLimits` and the folder's room, any other request by `MAX_OTHER_BODY`, which keeps a
    client's strings out of gradio's replies and log lines beyond that size); a dropped upload costs
    one log line instead of gradio's traceback."""

    def __init__(self, app, ledger: UploadLedger):
        self.app = app
        self.ledger = ledger

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        upload = scope["path"].endswith(UPLOAD_ROUTE)
        limit = self.ledger.limits.max_request_bytes if upload else MAX_OTHER_BODY
        declared = dict(scope["headers"]).get(b"content-length", b"")
        declared_bytes = int(declared) if declared.isdigit() else limit
        if declared_bytes > limit:
            return await _refuse(scope, send, 413, self._too_large(declared_bytes, upload))
        if upload and (refusal := self.ledger.admit(declared_bytes)) is not None:
            return await _refuse(scope, send, 503, refusal, {"retry-after": "60"})

        received = 0
        status: list[int] = []
        body = bytearray()

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise _TooLarge
            return message

        async def recorded_send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            elif upload and message["type"] == "http.response.body" and status == [200]:
                body.extend(message.get("body", b""))
            await send(message)

        paths: list[str] = []
        try:
            await self.app(scope, counted_receive, recorded_send)
            if upload and status == [200]:
                paths = [path for path in json.loads(bytes(body)) if isinstance(path, str)]
        except _TooLarge:
            if not status:
                await _refuse(scope, send, 413, self._too_large(received, upload))
        except ClientDisconnect:
            log.info("%s dropped by the client after %d bytes", scope["path"], received)
        finally:
            if upload:
                self.ledger.received(declared_bytes, paths)

    def _too_large(self, size: int, upload: bool) -> str:
        if upload:
            return (f"Upload too large: {size / 2**20:.0f} MB in one request; the limit is one X-ray file of up to "
                    f"{self.ledger.limits.max_file_bytes / 2**20:.0f} MB per request.")
        return f"Request too large: {size:,} bytes; the limit is {MAX_OTHER_BODY:,} (files go to {UPLOAD_ROUTE})."


class _TooLarge(Exception):
    pass


async def _refuse(scope, send, status: int, message: str, headers: dict | None = None) -> None:
    log.info("refused %s (%d): %s", scope["path"], status, message)
    await PlainTextResponse(message, status_code=status, headers=headers)(scope, None, send)


async def unknown_endpoint(request, error: Exception):
    """A clean 404 for a call to an endpoint the app does not have: gradio raises FnIndexInferError for an
    unknown api_name and KeyError for an unknown fn_index, which reach the log as tracebacks. Any other
    KeyError is raised on, as before."""
    route = request.url.path
    if isinstance(error, KeyError) and not (
            error.args and isinstance(error.args[0], int) and any(part in route for part in ENDPOINT_ROUTES)):
        raise error
    name = f"fn_index {error.args[0]}" if isinstance(error, KeyError) else route.rstrip("/").rsplit("/", 1)[-1]
    log.info("unknown endpoint: %s %s", shortened(route), shortened(name))
    return PlainTextResponse(f"No endpoint {shortened(name)}: this app's endpoints are listed at /gradio_api/info.",
                             status_code=404)
