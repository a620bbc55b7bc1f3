"""The real app's edges (`python app.py` called over HTTP and by gradio_client): a bounded upload folder
that uploads leave once used, bounded request bodies and log lines, hidden image folder names, only
uploaded files read, no monitoring, a clean answer for an unknown endpoint (issue #31)."""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from pneumonia_vit.serving.uploads import UploadLedger, UploadLimits
from tests.app_server import REPO, running_app

EXAMPLE = REPO / "examples" / "pneumonia_1.jpeg"
FOLDER_FILES = UploadLimits(max_file_bytes=0).max_files


@pytest.fixture(scope="module")
def app(served_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("limits")
    with running_app(served_model_dir, folder / "app.log", env={"GRADIO_TEMP_DIR": str(folder / "cache")}) as running:
        running.cache = folder / "cache"
        yield running


@pytest.fixture(scope="module")
def client(app):
    from gradio_client import Client

    return Client(app.url, verbose=False)


def files_in(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if path.is_file()}


def upload(url: str, name: str, content: bytes) -> httpx.Response:
    return httpx.post(url + "gradio_api/upload", files=[("files", (name, content))], timeout=60)


def test_uploads_are_deleted_once_their_request_is_answered_or_refused(app, client, data_root):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    before = files_in(app.cache)
    xrays = sorted((data_root / "chest_xray_224" / "test" / "PNEUMONIA").glob("*.jpeg"))[:4]
    for xray in xrays:
        assert client.predict(handle_file(str(xray)), api_name="/predict")["label"] in ("NORMAL", "PNEUMONIA")
    junk = app.cache.parent / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(AppError, match="not a readable image"):
        client.predict(handle_file(str(junk)), api_name="/predict")
    client.predict(handle_file(str(EXAMPLE)), api_name="/predict")  # the bytes of an example: its copy stays

    left = {path.name for path in files_in(app.cache) - before if not path.name.startswith("image.")}
    assert left == set(), "uploads left after their requests"
    assert before <= files_in(app.cache), "an upload of an example's bytes deleted the example's copy"


def test_preview_and_heatmap_folders_are_not_named_by_the_images_sha256(app):
    from gradio_client import Client, handle_file

    server_side = Client(app.url, verbose=False, download_files=False)  # the app's paths, not local copies
    preview, *_, heatmap, _ = server_side.predict(handle_file(str(EXAMPLE)), api_name="/analyze")
    for shown in (preview, heatmap):
        path = Path(shown["path"])
        assert path.is_relative_to(app.cache) and len(path.parent.name) == 64
        assert path.parent.name != hashlib.sha256(path.read_bytes()).hexdigest()
        assert path.parent.name != hashlib.sha256(EXAMPLE.read_bytes()).hexdigest()


def test_several_large_files_in_one_upload_are_refused_before_anything_is_stored(app):
    before = files_in(app.cache)
    blob = os.urandom(20 * 2**20)
    reply = httpx.post(app.url + "gradio_api/upload", timeout=60,
                       files=[("files", (f"film{i}.png", blob)) for i in range(3)])
    assert reply.status_code == 413
    assert "one X-ray file of up to 50 MB per request" in reply.text
    assert files_in(app.cache) == before


def test_a_huge_path_string_gets_a_short_error_and_a_short_log_line(app):
    huge = "/tmp/" + "a" * 50_000_000
    reply = httpx.post(app.url + "gradio_api/queue/join", timeout=60, json={
        "data": [{"path": huge, "meta": {"_type": "gradio.FileData"}}], "fn_index": 0, "session_hash": "huge"})
    assert reply.status_code == 413
    assert len(reply.text) < 300 and "Request too large" in reply.text
    assert max(len(line) for line in app.log_text().splitlines()) < 1000


def test_a_path_outside_the_upload_folder_is_refused(app, client):
    predict = next(dependency["id"] for dependency in client.config["dependencies"]
                   if dependency.get("api_name") == "predict")
    for path in ("http://127.0.0.1:9/film.png", "/etc/hostname"):
        reply = httpx.post(app.url + "gradio_api/queue/join", timeout=30, json={
            "data": [{"path": path, "is_stream": True, "meta": {"_type": "gradio.FileData"}}],
            "fn_index": predict, "session_hash": "outside"})
        assert reply.status_code >= 400, path
        assert "uploaded" in reply.text, reply.text


def test_monitoring_is_off_and_prints_nothing(app):
    assert httpx.get(app.url + "monitoring", timeout=30).status_code == 403
    assert "Monitoring URL" not in app.log_text()


def test_an_unknown_endpoint_gets_a_clean_404_and_no_traceback_in_the_log(app):
    for route, body in (("gradio_api/call/no_such_endpoint", {"data": [None]}),
                        ("gradio_api/queue/join", {"data": [None], "fn_index": 999, "session_hash": "unknown"})):
        reply = httpx.post(app.url + route, json=body, timeout=30)
        assert reply.status_code == 404, reply.text
        assert "/gradio_api/info" in reply.text
    assert "Traceback" not in app.log_text()


def test_the_upload_folder_stays_under_its_bound_under_quick_uploads(served_model_dir, tmp_path):
    """100 quick uploads are stored; beyond the folder's bound in files, uploads are refused with a 503 that
    says to retry; the folder never holds more (its own app: a full folder refuses uploads for minutes)."""
    cache = tmp_path / "cache"
    with running_app(served_model_dir, tmp_path / "app.log", env={"GRADIO_TEMP_DIR": str(cache)}) as app:
        before = files_in(cache)
        contents = [f"upload {i}".encode() for i in range(FOLDER_FILES + 44)]
        with ThreadPoolExecutor(8) as pool:
            first = list(pool.map(lambda i: upload(app.url, f"f{i}.png", contents[i]), range(100)))
            assert all(reply.status_code == 200 for reply in first)
            rest = list(pool.map(lambda i: upload(app.url, f"f{i}.png", contents[i]), range(100, len(contents))))
        refused = [reply for reply in rest if reply.status_code == 503]
        assert len(refused) == len(contents) - FOLDER_FILES
        assert "upload space is full" in refused[0].text and refused[0].headers["retry-after"] == "60"
        assert len(files_in(cache) - before) == FOLDER_FILES
        assert "Traceback" not in app.log_text()


def test_unused_uploads_and_dropped_partial_files_are_deleted_by_a_sweep_at_most_every_few_seconds(tmp_path):
    """The sweep scans the whole upload folder (gradio's previews and examples too): once per `sweep_every_s`,
    not once per upload."""
    ledger = UploadLedger(tmp_path, UploadLimits(max_file_bytes=100, unused_ttl_s=0.2, sweep_every_s=0.6))
    unused = tmp_path / "a1b2" / "film.png"
    unused.parent.mkdir()
    unused.write_bytes(b"film")
    assert ledger.admit(4) is None
    ledger.received(4, [str(unused)])
    partial = tmp_path / "tmp_dropped"  # gradio's temporary file of an upload dropped a minute ago
    partial.write_bytes(b"half a film")
    os.utime(partial, (time.time() - 60, time.time() - 60))
    time.sleep(0.3)
    assert ledger.admit(4) is None and ledger.reserved == [1, 4]
    assert unused.exists() and partial.exists()  # past its time to live, but the folder was scanned 0.3 s ago
    time.sleep(0.4)
    assert ledger.admit(4) is None
    assert not unused.exists() and not unused.parent.exists() and not partial.exists()
    assert not ledger.holds(unused)
