"""A crowd against the real app (`python app.py`): refusals, dropped connections, latency, and memory
under repeated bursts of new clients.

    python -m benchmarks.crowd                      # one app, about 5 minutes on 2 cores
    python -m benchmarks.crowd --runs 3             # three apps in a row, each with all phases (memory goal)
    python -m benchmarks.crowd --bursts 10 --label ten-bursts   # a longer memory run: a trend or not
    python -m benchmarks.crowd --label baseline     # the same run, results under another name
    python -m benchmarks.crowd --quick              # 20 clients, 3 bursts, a 60-client spike

Each run is one app process (the defaults: fast path, batching), three phases in a row:
1. crowd, the warm-up: --clients (100) threads, each its own `gradio_client.Client` (its own session, as
   a browser would be), all released at once, each sending --requests (10) calls one after the other,
   every fifth one to /analyze (the page's endpoint, with the heatmap), the rest to /predict. Reported:
   answers, errors by kind, p50/p95 round trip, images/s (answers / wall time of the phase), and the
   server's CPU milliseconds per request, the figure that least depends on the machine's other load.
2. bursts: --bursts (3) more bursts of the same size, each from --clients NEW clients (new sessions, as
   a Space's visitors arrive). Reported: the server's RSS (/proc, VmRSS) after the warm-up and after
   each burst, and its growth over the bursts (goal <= 5%, every request answered).
3. spike: --spike (300) clients released at once, one /predict each; every refusal must be the app's
   "busy" answer, no connection may drop, and one request after the spike must succeed.

Errors are sorted by kind: "busy" (the app's refusal), "queue full" (gradio's own refusal),
"dropped" (the connection closed mid-answer: httpx RemoteProtocolError/ReadError and the like),
"client setup" (`Client(url)` failed: it reads the app's config before any request), "other" (such
as gradio_client's 5 s HTTP timeout on the upload or the queue join). The clients share the machine's
CPUs with the app; the CPU busy share before the run is recorded (benchmarks/harness.py).
Results: benchmarks/results/crowd[_<label>].{json,md} (-quick with --quick); the apps' logs:
~/.cache/pneumonia-vit-bench/crowd-logs/.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

from benchmarks.harness import REPO, SCRATCH, bundled_dir, markdown_table, percentiles, status_mib, write_results
from tests.app_server import running_app

# The pediatric examples: /predict refuses the adult one as out of domain, an answer this benchmark does not count.
EXAMPLES = sorted(path for path in (REPO / "examples").glob("*.jpeg") if not path.name.startswith("adult"))
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


def one_run(folder: Path, run: int, args, clients: int, spike: int) -> dict:
    """One app process through the three phases."""
    log_path = LOG_DIR / f"app{'_' + args.label if args.label else ''}{f'_run{run}' if args.runs > 1 else ''}.log"
    data: dict = {}
    with running_app(folder, log_path, env=DEFAULTS) as app:
        pid = app.process.pid
        data["rss_after_start_mib"] = rss_mib(pid)
        print(f"run {run}: app up in {app.startup_s:.1f} s, RSS {data['rss_after_start_mib']} MiB", flush=True)

        print(f"crowd (warm-up): {clients} clients x {args.requests} requests ...", flush=True)
        crowd = data["crowd"] = measured_phase(pid, app.url, clients, args.requests)
        print(f"  {crowd['answered']} answered, errors {crowd['errors']}, p95 {crowd.get('p95_ms', 0):.0f} ms, "
              f"{crowd['images_per_s']:.1f} images/s", flush=True)

        rss = [rss_mib(pid)]
        print(f"bursts: {args.bursts} x {clients} new clients x {args.requests} requests; RSS after the warm-up "
              f"{rss[0]} MiB", flush=True)
        bursts = []
        for burst in range(1, args.bursts + 1):
            result = measured_phase(pid, app.url, clients, args.requests)
            rss.append(rss_mib(pid))
            bursts.append({"answered": result["answered"], "errors": result["errors"], "rss_mib": rss[-1],
                           "p95_ms": result.get("p95_ms")})
            print(f"  burst {burst}: {result['answered']} answered, errors {result['errors']}, RSS {rss[-1]} MiB",
                  flush=True)
        data["bursts"] = {"rss_mib": rss, "growth": rss[-1] / rss[0] - 1, "each": bursts,
                          "answered": sum(b["answered"] for b in bursts),
                          "sent": args.bursts * clients * args.requests}

        print(f"spike: {spike} clients x 1 /predict ...", flush=True)
        spike_result = data["spike"] = measured_phase(pid, app.url, spike, 1, analyze_every=0)
        after_tally = Tally()
        run_clients(app.url, 1, 1, after_tally, analyze_every=0)
        spike_result["next_request_answered"] = len(after_tally.latencies) == 1
        spike_result["next_request_errors"] = after_tally.errors
        print(f"  {spike_result['answered']} answered, errors {spike_result['errors']}, next request answered: "
              f"{spike_result['next_request_answered']}", flush=True)
        data["rss_at_end_mib"] = rss_mib(pid)
        data["peak_mib"] = round(status_mib("VmHWM", pid), 1)
    return data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--label", default="", help="results go to crowd_<label>.* (e.g. baseline)")
    parser.add_argument("--clients", type=int, help="clients per burst (default 100; 20 with --quick)")
    parser.add_argument("--requests", type=int, default=10, help="requests per client")
    parser.add_argument("--bursts", type=int, default=3, help="bursts of new clients after the warm-up")
    parser.add_argument("--runs", type=int, default=1, help="app processes, one after the other")
    parser.add_argument("--spike", type=int, help="clients of the spike, one /predict each (default 300; 60 with --quick)")
    parser.add_argument("--model", help="default: $MODEL_ID, else the bundled model")
    args = parser.parse_args(argv)
    clients = args.clients or (20 if args.quick else 100)
    spike = args.spike or (60 if args.quick else 300)
    folder, trained = bundled_dir(args.model)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    runs = [one_run(folder, run, args, clients, spike) for run in range(1, args.runs + 1)]
    data: dict = {"args": vars(args), "model": str(folder), "trained": trained, "runs": runs}

    def p95(result: dict, endpoint: str):
        return result["by_endpoint"].get(endpoint, {}).get("p95_ms", "-")

    verdicts, rows, memory_rows = [], [], []
    for number, run in enumerate(runs, 1):
        crowd, bursts, spike_result = run["crowd"], run["bursts"], run["spike"]
        unclear = {kind: n for kind, n in spike_result["errors"].items() if kind != "busy"}
        all_answered = bursts["answered"] == bursts["sent"]
        verdicts += [
            f"run {number}, warm-up {clients} clients x {args.requests}: {crowd['error_count']} errors "
            f"({crowd['errors'].get('dropped', 0)} dropped connections) -> {'PASS' if crowd['error_count'] == 0 else 'FAIL'}",
            f"run {number}, {args.bursts} bursts of {clients} new clients x {args.requests}: {bursts['answered']} of "
            f"{bursts['sent']} answered, RSS growth over the bursts {100 * bursts['growth']:+.1f}% (goal <= +5%) -> "
            f"{'PASS' if all_answered and bursts['growth'] <= 0.05 else 'FAIL'}",
            f"run {number}, {spike} clients at once: {spike_result['answered']} answered, "
            f"{spike_result['errors'].get('busy', 0)} refused as busy, other errors {unclear or 0}; next request "
            f"answered: {spike_result['next_request_answered']} -> "
            f"{'PASS' if not unclear and spike_result['next_request_answered'] else 'FAIL'}",
        ]
        rows += [
            [number, "warm-up", f"{clients} x {args.requests}", crowd["answered"], crowd["errors"] or 0,
             crowd.get("p50_ms", "-"), crowd.get("p95_ms", "-"), p95(crowd, "/predict"), p95(crowd, "/analyze"),
             crowd["images_per_s"], crowd["slowest_refusal_ms"] or "-", crowd["server_cpu_ms_per_request"]],
            [number, "spike", f"{spike} x 1", spike_result["answered"], spike_result["errors"] or 0,
             spike_result.get("p50_ms", "-"), spike_result.get("p95_ms", "-"), p95(spike_result, "/predict"), "-",
             spike_result["images_per_s"], spike_result["slowest_refusal_ms"] or "-",
             spike_result["server_cpu_ms_per_request"]],
        ]
        memory_rows.append([number, run["rss_after_start_mib"], *bursts["rss_mib"], f"{100 * bursts['growth']:+.1f}%",
                            run["peak_mib"], run["rss_at_end_mib"]])
    data["verdicts"] = verdicts
    markdown = "\n\n".join([
        f"### Crowd{' (' + args.label + ')' if args.label else ''}: `python app.py`, model `{folder.name}`, "
        f"1 call in {ANALYZE_EVERY} to /analyze in the warm-up and the bursts\n\n"
        + markdown_table(["run", "phase", "clients x requests", "answered", "errors", "p50 ms", "p95 ms",
                          "p95 /predict ms", "p95 /analyze ms", "images/s", "slowest refusal ms",
                          "server CPU ms per request"], rows)
        + "\n\nA refusal's time includes the client's upload, which gradio_client sends before it asks to join the queue.",
        f"### Memory (RSS, MiB) under bursts of {clients} new clients x {args.requests} requests\n\n" + markdown_table(
            ["run", "after start", "after the warm-up", *(f"after burst {b}" for b in range(1, args.bursts + 1)),
             "growth over the bursts", "peak", "after the spike"], memory_rows),
        "### Goals\n\n" + "\n".join(f"- {line}" for line in verdicts),
    ])
    write_results(f"crowd_{args.label}" if args.label else "crowd", args.quick, data, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
