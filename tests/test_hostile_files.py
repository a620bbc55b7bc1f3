"""Decompression and page bombs sent to a real `python app.py` through gradio_client (issue #31).

Each is answered (a clear refusal, or an answer) within TIME_LIMIT_S, the server's peak memory while
answering it stays within PEAK_LIMIT_MIB of its resident size just before, and a normal X-ray sent
right after is answered at the speed it was before.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest

from tests.app_server import REPO, running_app
from tests.odd_files import deflated_dicom_bomb, rgba_png, tiff_page_chain

XRAY = REPO / "examples" / "normal_1.jpeg"
TIME_LIMIT_S = 3.0
PEAK_LIMIT_MIB = 600
BOMBS = {
    "deflated_1GiB.dcm": deflated_dicom_bomb,  # 1 MB, its pixel data inflates to 1 GiB
    "pages_50000.tif": tiff_page_chain,  # 5.9 MB: a 256 px page, then 49,999 pages of one pixel
    "rgba_7000.png": rgba_png,  # 260 KB: 7000×7000 RGBA, 49 megapixels
}


@pytest.fixture(scope="module")
def app(served_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile_app")
    with running_app(served_model_dir, folder / "app.log", env={"GRADIO_TEMP_DIR": str(folder / "cache")}) as app:
        yield app


@pytest.fixture(scope="module")
def client(app):
    from gradio_client import Client

    return Client(app.url, verbose=False)


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bombs")
    for name, make in BOMBS.items():
        (folder / name).write_bytes(make())
    return {name: folder / name for name in BOMBS}


def timed_predict(client, path: Path) -> tuple[float, object]:
    """Seconds from upload to answer, and the answer or the AppError the app raised."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    start = time.perf_counter()
    try:
        outcome = client.predict(handle_file(str(path)), api_name="/predict")
    except AppError as error:
        outcome = error
    return time.perf_counter() - start, outcome


def memory_mib(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


@pytest.mark.parametrize("name", BOMBS)
def test_bomb_is_answered_in_time_within_bounded_memory_and_the_server_keeps_its_speed(app, client, bombs, name):
    normal_s = statistics.median(timed_predict(client, XRAY)[0] for _ in range(3))
    pid = app.process.pid
    # Writing 5 to clear_refs restarts VmHWM (peak resident size) from VmRSS now: VmHWM after the request
    # is the server's true peak during it, with no sampling gap, and not its start-up peak.
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    resident_before = memory_mib(pid, "VmRSS")
    seconds, outcome = timed_predict(client, bombs[name])
    peak_above = memory_mib(pid, "VmHWM") - resident_before
    print(f"{name}: {seconds:.2f} s, peak +{peak_above:.0f} MiB over {resident_before:.0f} MiB, "
          f"held after +{memory_mib(pid, 'VmRSS') - resident_before:.0f} MiB, normal request {normal_s:.2f} s: {outcome}")
    assert seconds < TIME_LIMIT_S
    assert peak_above < PEAK_LIMIT_MIB
    if name.endswith(".dcm"):
        assert "537 megapixels); the limit is 50 megapixels" in str(outcome)
    after_s = timed_predict(client, XRAY)[0]
    assert app.process.poll() is None
    assert after_s < 2 * normal_s + 0.3, f"a normal request took {after_s:.2f} s after the bomb, {normal_s:.2f} s before"
