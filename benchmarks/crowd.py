"""A crowd against the real app (`python app.py`, its defaults): refusals, dropped connections, latency, and memory
under repeated bursts of new clients (harness.run_clients). Each of --runs app processes goes through three phases:
1. warm-up: --clients clients, --requests calls each, one in ANALYZE_EVERY to /analyze;
2. bursts: --bursts more of the same from new clients (as a Space's visitors arrive), the server's RSS after each
   (goal: at most 5% growth over them, every request answered);
3. spike: --spike clients at once, one /predict each: every refusal must be the app's "busy", no connection may
   drop, and one request after it must be answered.
The server's CPU ms per request is the figure that least depends on the machine's other load.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from benchmarks.harness import SCRATCH, Tally, options, run_clients, section, status_mib, verdict, write_results
from tests.app_server import running_app

ANALYZE_EVERY = 5
LOG_DIR = SCRATCH / "crowd-logs"
DEFAULTS = {"PNEUMONIA_VIT_FAST": "1"}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured_phase(pid: int, url: str, clients: int, requests: int, analyze_every: int = ANALYZE_EVERY) -> dict:
    """`run_clients`, summarised, with the server's CPU milliseconds per request sent."""
    tally = Tally()
    cpu_before = cpu_seconds(pid)
    result = tally.summary(run_clients(url, clients, requests, tally, analyze_every))
    result["server_cpu_ms_per_request"] = 1000 * (cpu_seconds(pid) - cpu_before) / (clients * requests)
    print(f"  {clients} x {requests}: {result['answered']} answered, errors {result['errors']}", flush=True)
    return result


def one_run(folder: Path, run: int, args, clients: int, spike: int) -> dict:
    """One app process through the three phases."""
    with running_app(folder, LOG_DIR / f"app_run{run}.log", env=DEFAULTS) as app:
        pid = app.process.pid

        def rss() -> float:
            return round(status_mib("VmRSS", pid), 1)

        data: dict = {"rss_after_start_mib": rss()}
        print(f"run {run}: app up in {app.startup_s:.1f} s, RSS {data['rss_after_start_mib']} MiB; warm-up", flush=True)
        data["crowd"] = measured_phase(pid, app.url, clients, args.requests)
        rss_mib, bursts = [rss()], []
        for _ in range(args.bursts):
            result = measured_phase(pid, app.url, clients, args.requests)
            rss_mib.append(rss())
            bursts.append({"answered": result["answered"], "errors": result["errors"], "rss_mib": rss_mib[-1],
                           "p95_ms": result.get("p95_ms")})
        data["bursts"] = {"rss_mib": rss_mib, "growth": rss_mib[-1] / rss_mib[0] - 1, "each": bursts,
                          "answered": sum(b["answered"] for b in bursts), "sent": args.bursts * clients * args.requests}
        print(f"bursts: RSS {rss_mib} MiB; spike", flush=True)
        spike_result = data["spike"] = measured_phase(pid, app.url, spike, 1, analyze_every=0)
        after = Tally()
        run_clients(app.url, 1, 1, after, analyze_every=0)
        spike_result["next_request_answered"] = len(after.answers) == 1
        spike_result["next_request_errors"] = after.errors
        data["rss_at_end_mib"] = rss()
        data["peak_mib"] = round(status_mib("VmHWM", pid), 1)
    return data


def main(argv=None) -> int:
    parser = options(__doc__, "model")
    parser.add_argument("--clients", type=int, help="clients per burst (default 100; --quick 20)")
    parser.add_argument("--requests", type=int, default=10, help="requests per client")
    parser.add_argument("--bursts", type=int, default=3, help="bursts of new clients after the warm-up")
    parser.add_argument("--runs", type=int, default=1, help="app processes, one after the other")
    parser.add_argument("--spike", type=int, help="clients of the spike, one /predict each (default 300; --quick 60)")
    args = parser.parse_args(argv)
    clients = args.clients or (20 if args.quick else 100)
    spike = args.spike or (60 if args.quick else 300)
    folder = args.model
    runs = [one_run(folder, run, args, clients, spike) for run in range(1, args.runs + 1)]
    data: dict = {"args": vars(args), "model": str(folder), "runs": runs}

    def p95(result: dict, endpoint: str):
        return result["by_endpoint"].get(endpoint, {}).get("p95_ms", "-")

    def row(number: int, phase: str, shape: str, result: dict) -> list:
        return [number, phase, shape, result["answered"], result["errors"] or 0, result.get("p50_ms", "-"),
                result.get("p95_ms", "-"), p95(result, "/predict"), p95(result, "/analyze"), result["images_per_s"],
                result["slowest_refusal_ms"] or "-", result["server_cpu_ms_per_request"]]

    verdicts, rows, memory_rows = [], [], []
    for number, run in enumerate(runs, 1):
        crowd, bursts, spike_result = run["crowd"], run["bursts"], run["spike"]
        unclear = {kind: n for kind, n in spike_result["errors"].items() if kind != "busy"}
        shape = f"{clients} x {args.requests}"
        verdicts += [
            verdict(f"run {number}, warm-up {clients} clients x {args.requests}: {crowd['error_count']} errors "
                    f"({crowd['errors'].get('dropped', 0)} dropped connections)", crowd["error_count"] == 0),
            verdict(f"run {number}, {args.bursts} bursts of {clients} new clients x {args.requests}: "
                    f"{bursts['answered']} of {bursts['sent']} answered, RSS growth over the bursts "
                    f"{100 * bursts['growth']:+.1f}% (goal <= +5%)",
                    bursts["answered"] == bursts["sent"] and bursts["growth"] <= 0.05),
            verdict(f"run {number}, {spike} clients at once: {spike_result['answered']} answered, "
                    f"{spike_result['errors'].get('busy', 0)} refused as busy, other errors {unclear or 0}; "
                    f"next request answered: {spike_result['next_request_answered']}",
                    not unclear and spike_result["next_request_answered"]),
        ]
        rows += [row(number, "warm-up", shape, crowd), row(number, "spike", f"{spike} x 1", spike_result)]
        memory_rows.append([number, run["rss_after_start_mib"], *bursts["rss_mib"], f"{100 * bursts['growth']:+.1f}%",
                            run["peak_mib"], run["rss_at_end_mib"]])
    write_results("crowd", args, data, [
        section(f"Crowd: `python app.py`, model `{folder.name}`, 1 call in {ANALYZE_EVERY} to /analyze in the warm-up "
                "and the bursts", ["run", "phase", "clients x requests", "answered", "errors", "p50 ms", "p95 ms",
                                   "p95 /predict ms", "p95 /analyze ms", "images/s", "slowest refusal ms",
                                   "server CPU ms per request"], rows,
                "A refusal's time includes the client's upload, which gradio_client sends before it asks to join "
                "the queue."),
        section(f"Memory (RSS, MiB) under bursts of {clients} new clients x {args.requests} requests",
                ["run", "after start", "after the warm-up", *(f"after burst {b}" for b in range(1, args.bursts + 1)),
                 "growth over the bursts", "peak", "after the spike"], memory_rows),
    ], verdicts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
