"""A crowd against the real app (`python app.py`): refusals, dropped connections, latency and memory.

    python -m benchmarks.crowd                      # about 4 minutes on 2 cores
    python -m benchmarks.crowd --label baseline     # the same run, results under another name
    python -m benchmarks.crowd --quick              # 20 clients, 200 further requests, a 60-client burst

One app process (the defaults: fast path, batching), three phases in a row:
1. crowd: --clients (100) threads, each its own `gradio_client.Client` (its own session, as a browser
   would be), all released at once, each sending --requests (10) calls one after the other, every
   fifth one to /analyze (the page's endpoint, with the heatmap), the rest to /predict. Reported:
   answers, errors by kind, p50/p95 round trip, images/s (answers / wall time of the phase), and the
   server's CPU milliseconds per request, the figure that least depends on the machine's other load.
   This phase is also the warm-up of phase 2.
2. memory: the server's RSS (/proc, VmRSS) right after phase 1, then after every 200 of
   --memory-requests (1,200) further mixed calls from 8 clients (same 1-in-5 /analyze mix).
   Reported: growth of the final RSS over the post-warm-up RSS.
3. burst: --burst (300) clients released at once, one /predict each; every refusal must be the
   app's "busy" answer, no connection may drop, and one request after the burst must succeed.

Errors are sorted by kind: "busy" (the app's refusal), "queue full" (gradio's own refusal),
"dropped" (the connection closed mid-answer: httpx RemoteProtocolError/ReadError and the like),
"client setup" (`Client(url)` failed: it reads the app's config before any request), "other" (such
as gradio_client's 5 s HTTP timeout on the upload or the queue join). The clients share the machine's CPUs with the app; the CPU busy share before the run is
recorded (benchmarks/_common.py).
Results: benchmarks/results/crowd[_<label>].{json,md} (-quick with --quick); the app's log:
~/.cache/pneumonia-vit-bench/crowd-logs/.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

from benchmarks._common import REPO, SCRATCH, bundled_dir, markdown_table, percentiles, write_results
from benchmarks.memory import status_mib
from tests.app_server import running_app

EXAMPLES = sorted((REPO / "examples").glob("*.jpeg"))
ANALYZE_EVERY = 5  # one call in five goes to /analyze
LOG_DIR = SCRATCH / "crowd-logs"
DEFAULTS = {"PNEUMONIA_VIT_FAST": "1", "PNEUMONIA_VIT_BATCH": "8"}


def error_kind(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    if "busy" in text.lower():
        return "busy"
    if "queue is full" in text.lower():
        return "queue full"
    if any(name in text for name in ("RemoteProtocolError", "ReadError", "ConnectError", "ConnectionReset",
                                     "RemoteDisconnected", "peer closed")):
        return "dropped"
    return "other"


class Tally:
    """Answers and errors of one phase, from many client threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.by_endpoint: dict[str, list[float]] = {}
        self.errors: dict[str, list[str]] = {}
        self.error_latencies: list[float] = []

    def answered(self, seconds: float, endpoint: str) -> None:
        with self.lock:
            self.latencies.append(seconds)
            self.by_endpoint.setdefault(endpoint, []).append(seconds)

    def failed(self, error: BaseException, seconds: float | None) -> None:
        """seconds: None for a client that failed before sending anything (Client() reads the app's config)."""
        kind = error_kind(error) if seconds is not None else "client setup"
        with self.lock:
            self.errors.setdefault(kind, []).append(f"{type(error).__name__}: {error}"[:300])
            if seconds is not None:
                self.error_latencies.append(seconds)

    def summary(self, wall: float) -> dict:
        counts = {kind: len(messages) for kind, messages in self.errors.items()}
        return {
            "answered": len(self.latencies), "errors": counts, "error_count": sum(counts.values()),
            "error_examples": {kind: sorted(set(messages))[:3] for kind, messages in self.errors.items()},
            "wall_s": wall, "images_per_s": len(self.latencies) / wall if wall > 0 else float("nan"),
            **(percentiles(self.latencies) if self.latencies else {}),
            "by_endpoint": {endpoint: percentiles(times) for endpoint, times in sorted(self.by_endpoint.items())},
            "slowest_refusal_ms": 1000 * max(self.error_latencies) if self.error_latencies else None,
        }


def call(client, index: int, analyze: bool):
    from gradio_client import handle_file

    file = handle_file(str(EXAMPLES[index % len(EXAMPLES)]))
    if analyze:
        return client.predict(file, api_name="/analyze")
    value = client.predict(file, api_name="/predict")
    if value.get("label") not in ("NORMAL", "PNEUMONIA"):
        raise ValueError(f"unexpected answer {value!r}")
    return value


def run_clients(url: str, clients: int, requests: int, tally: Tally, analyze_every: int = ANALYZE_EVERY) -> float:
    """`clients` threads, each its own Client made before the start signal; returns the wall time from
    the signal to the last answer."""
    from gradio_client import Client

    start = threading.Event()
    ready = threading.Semaphore(0)

    def client_thread(index: int) -> None:
        try:
            client = Client(url, verbose=False, ssl_verify=False)
        except Exception as error:  # noqa: BLE001
            tally.failed(error, None)
            return
        finally:
            ready.release()
        start.wait()
        for i in range(requests):
            analyze = analyze_every > 0 and (index + i) % analyze_every == 0
            sent = time.perf_counter()
            try:
                call(client, index + i, analyze)
            except Exception as error:  # noqa: BLE001
                tally.failed(error, time.perf_counter() - sent)
                continue
            tally.answered(time.perf_counter() - sent, "/analyze" if analyze else "/predict")

    threads = [threading.Thread(target=client_thread, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for _ in threads:
        ready.acquire()
    begin = time.perf_counter()
    start.set()
    for thread in threads:
        thread.join()
    return time.perf_counter() - begin


def rss_mib(pid: int) -> float:
    return round(status_mib("VmRSS", pid), 1)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat): unlike latency, the server's CPU
    per request hardly depends on what else runs on the machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured_phase(pid: int, url: str, clients: int, requests: int, analyze_every: int = ANALYZE_EVERY) -> dict:
    """`run_clients`, summarised, with the server's CPU milliseconds per request sent."""
    tally = Tally()
    cpu_before = cpu_seconds(pid)
    result = tally.summary(run_clients(url, clients, requests, tally, analyze_every))
    result["server_cpu_ms_per_request"] = 1000 * (cpu_seconds(pid) - cpu_before) / (clients * requests)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--label", default="", help="results go to crowd_<label>.* (e.g. baseline)")
    parser.add_argument("--clients", type=int)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--memory-requests", type=int)
    parser.add_argument("--burst", type=int)
    parser.add_argument("--model", help="default: $MODEL_ID, else the bundled model")
    args = parser.parse_args(argv)
    clients = args.clients or (20 if args.quick else 100)
    memory_requests = args.memory_requests or (200 if args.quick else 1200)
    burst = args.burst or (60 if args.quick else 300)
    folder, trained = bundled_dir(args.model)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"app{'_' + args.label if args.label else ''}.log"
    data: dict = {"args": vars(args), "model": str(folder), "trained": trained}
    with running_app(folder, log_path, env=DEFAULTS) as app:
        pid = app.process.pid
        data["rss_after_start_mib"] = rss_mib(pid)
        print(f"app up in {app.startup_s:.1f} s, RSS {data['rss_after_start_mib']} MiB", flush=True)

        print(f"crowd: {clients} clients x {args.requests} requests ...", flush=True)
        crowd = measured_phase(pid, app.url, clients, args.requests)
        data["crowd"] = crowd
        print(f"  {crowd['answered']} answered, errors {crowd['errors']}, p95 {crowd.get('p95_ms', 0):.0f} ms, "
              f"{crowd['images_per_s']:.1f} images/s", flush=True)

        print(f"memory: {memory_requests} further mixed requests from 8 clients ...", flush=True)
        samples = [(0, rss_mib(pid))]
        memory_tally = Tally()
        step = 200
        for done in range(step, memory_requests + 1, step):
            run_clients(app.url, 8, step // 8, memory_tally)
            samples.append((done, rss_mib(pid)))
            print(f"  after {done}: RSS {samples[-1][1]} MiB", flush=True)
        growth = samples[-1][1] / samples[0][1] - 1
        data["memory"] = {"rss_samples_mib": samples, "growth": growth, "errors": memory_tally.errors,
                          "peak_mib": round(status_mib("VmHWM", pid), 1)}

        print(f"burst: {burst} clients x 1 /predict ...", flush=True)
        burst_result = measured_phase(pid, app.url, burst, 1, analyze_every=0)
        after_tally = Tally()
        run_clients(app.url, 1, 1, after_tally, analyze_every=0)
        burst_result["next_request_answered"] = len(after_tally.latencies) == 1
        burst_result["next_request_errors"] = after_tally.errors
        data["burst"] = burst_result
        print(f"  {burst_result['answered']} answered, errors {burst_result['errors']}, next request answered: "
              f"{burst_result['next_request_answered']}", flush=True)
        data["rss_at_end_mib"] = rss_mib(pid)

    unclear = {kind: n for kind, n in burst_result["errors"].items() if kind != "busy"}
    verdicts = [
        f"{clients} clients x {args.requests}: {crowd['error_count']} errors "
        f"({crowd['errors'].get('dropped', 0)} dropped connections) -> {'PASS' if crowd['error_count'] == 0 else 'FAIL'}",
        f"RSS growth after warm-up over {memory_requests} mixed requests: {100 * growth:+.1f}% (goal <= +10%) -> "
        f"{'PASS' if growth <= 0.10 else 'FAIL'}",
        f"{burst} clients at once: {burst_result['answered']} answered, {burst_result['errors'].get('busy', 0)} refused "
        f"as busy, other errors {unclear or 0}; next request answered: {burst_result['next_request_answered']} -> "
        f"{'PASS' if not unclear and burst_result['next_request_answered'] else 'FAIL'}",
    ]
    data["verdicts"] = verdicts
    def p95(result: dict, endpoint: str):
        return result["by_endpoint"].get(endpoint, {}).get("p95_ms", "-")

    rows = [
        ["crowd", f"{clients} x {args.requests}", crowd["answered"], crowd["errors"] or 0, crowd.get("p50_ms", "-"),
         crowd.get("p95_ms", "-"), p95(crowd, "/predict"), p95(crowd, "/analyze"), crowd["images_per_s"],
         crowd["slowest_refusal_ms"] or "-", crowd["server_cpu_ms_per_request"]],
        ["burst", f"{burst} x 1", burst_result["answered"], burst_result["errors"] or 0,
         burst_result.get("p50_ms", "-"), burst_result.get("p95_ms", "-"), p95(burst_result, "/predict"), "-",
         burst_result["images_per_s"], burst_result["slowest_refusal_ms"] or "-", burst_result["server_cpu_ms_per_request"]],
    ]
    markdown = "\n\n".join([
        f"### Crowd{' (' + args.label + ')' if args.label else ''}: `python app.py`, model `{folder.name}`, "
        f"1 call in {ANALYZE_EVERY} to /analyze in the crowd\n\n"
        + markdown_table(["phase", "clients x requests", "answered", "errors", "p50 ms", "p95 ms", "p95 /predict ms",
                          "p95 /analyze ms", "images/s", "slowest refusal ms", "server CPU ms per request"], rows)
        + "\n\nA refusal's time includes the client's upload, which gradio_client sends before it asks to join the queue.",
        "### Memory (RSS, MiB)\n\n" + markdown_table(
            ["further requests", "RSS MiB"], [[done, rss] for done, rss in samples])
        + f"\n\nAfter start {data['rss_after_start_mib']} MiB, peak {data['memory']['peak_mib']} MiB, "
          f"at the end {data['rss_at_end_mib']} MiB.",
        "### Goals\n\n" + "\n".join(f"- {line}" for line in verdicts),
    ])
    write_results(f"crowd_{args.label}" if args.label else "crowd", args.quick, data, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
