"""API throughput: the real app (`python app.py`) called by concurrent gradio_client clients (harness.run_clients).

Two apps, each its own process: "torch fp32" (PNEUMONIA_VIT_FAST=0, the baseline of every ratio) and "fast" (the
defaults: the int8 fast path). For 1, 4 and 8 clients every app is measured in turn, the other paused (an idle gradio server wakes up every millisecond), and the sweep repeated --rounds times, pooled.
gradio_client polls for a result every 50 ms: one client's round trip is about 60 ms whatever the app does.
Also /predict_batch against as many one-file /predict calls on the default app, one client, the answers compared.
"""

from __future__ import annotations

import re
import signal
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness import (
    EXAMPLES,
    REPO,
    SCRATCH,
    SHARED_DATA,
    Tally,
    client,
    labelled_files,
    options,
    percentiles,
    run_clients,
    section,
    spread,
    verdict,
    write_results,
)
from pneumonia_vit.serving.webapp import MAX_BATCH_FILES as BATCH_FILES  # the files of one call
from tests.app_server import RunningApp, running_app

CLIENTS = (1, 4, 8)
BASELINE, FAST = "torch fp32", "fast"
APPS = {BASELINE: {"PNEUMONIA_VIT_FAST": "0"}, FAST: {"PNEUMONIA_VIT_FAST": "1"}}
PROBABILITY_TOLERANCE = 0.02  # tests/test_fast_path.py
WARMUP = 2  # calls per client before the timing: connection, upload path
LOG_DIR = SCRATCH / "api-logs"  # the apps' logs of the last run
LAUNCHED = "To create a public link"  # gradio prints it once launch() has finished requesting its own URL


@dataclass
class App:
    name: str
    server: RunningApp
    pausable: bool  # only once launch() has finished: a process stopped before fails its check and exits

    def pause(self, paused: bool) -> None:
        if self.pausable and self.server.process.poll() is None:
            self.server.process.send_signal(signal.SIGSTOP if paused else signal.SIGCONT)


@contextmanager
def running(name: str, model: Path):
    """`python app.py` with APPS[name]'s settings, paused; continued and stopped after."""
    log_path = LOG_DIR / (re.sub(r"[^a-z0-9]+", "_", name) + ".log")
    with running_app(model, log_path, 300, env=APPS[name]) as server:
        print(f"{name}: up in {server.startup_s:.1f} s at {server.url} (log {log_path})", flush=True)
        settle = time.perf_counter() + 30
        while LAUNCHED not in server.log_text() and time.perf_counter() < settle:
            time.sleep(0.2)
        app = App(name, server, LAUNCHED in server.log_text())
        if not app.pausable:
            print(f"note: {name} is not paused between its measurements (no launch message in its log)")
        app.pause(True)
        try:
            yield app
        finally:
            app.pause(False)


def reference_scores(app: App) -> dict[str, tuple[float, str]]:
    """Each example once, one request at a time: (P(PNEUMONIA), label)."""
    from gradio_client import handle_file

    app_client, scores = client(app.server.url), {}
    for path in EXAMPLES:
        value = app_client.predict(handle_file(str(path)), api_name="/predict")
        scores[path.name] = ({item["label"]: item["confidence"] for item in value["confidences"]}["PNEUMONIA"],
                             value["label"])
    return scores


def one_file_answer(app_client, file) -> dict:
    """/predict's answer in /predict_batch's shape: the label and confidences, or the refusal."""
    from gradio_client.exceptions import AppError

    try:
        return app_client.predict(file, api_name="/predict")
    except AppError as error:
        return {"error": error.message}


def measure_batch_endpoint(app: App, calls: int) -> dict:
    """One client: the files (the examples, the adult one too, and test-split films of both classes) as one-file
    /predict calls, then as one /predict_batch call, `calls` times each, interleaved; the answers compared."""
    from gradio_client import handle_file

    test_split = SHARED_DATA / "chest_xray_224" / "test"
    films = [path for path, _ in spread(labelled_files(test_split), BATCH_FILES)] if test_split.is_dir() else []
    examples = sorted((REPO / "examples").glob("*.jpeg"))
    paths = (examples + films + examples * BATCH_FILES)[:BATCH_FILES]
    files = [handle_file(str(path)) for path in paths]
    app_client = client(app.server.url)
    app_client.predict(files[:2], api_name="/predict_batch")  # warm-up
    one_file_answer(app_client, files[0])
    seconds = {"/predict, one file a call": [], "/predict_batch": []}
    mismatches = []
    for _ in range(calls):
        start = time.perf_counter()
        singles = [one_file_answer(app_client, file) for file in files]
        seconds["/predict, one file a call"].append(time.perf_counter() - start)
        start = time.perf_counter()
        batched = app_client.predict(files, api_name="/predict_batch")
        seconds["/predict_batch"].append(time.perf_counter() - start)
        mismatches += [{"file": path.name, "predict": single, "predict_batch": answer}
                       for path, single, answer in zip(paths, singles, batched)
                       if {key: answer.get(key) for key in single} != single or answer["file"] != path.name]
    return {"files": [path.name for path in paths], "refused": sum("error" in answer for answer in singles),
            "mismatches": mismatches[:10], "mismatch_count": len(mismatches),
            "images_per_s": {way: len(files) * len(times) / sum(times) for way, times in seconds.items()},
            "seconds_per_call": {way: percentiles(times) for way, times in seconds.items()}}


def main(argv=None) -> int:
    parser = options(__doc__, "model")
    parser.add_argument("--requests", type=int, help="requests per client (default 100; --quick 5)")
    parser.add_argument("--rounds", type=int, help="times the whole sweep is repeated (default 2; --quick 1)")
    args = parser.parse_args(argv)
    requests, rounds = args.requests or (5 if args.quick else 100), args.rounds or (1 if args.quick else 2)
    folder = args.model
    cells = {(name, clients): {"tally": Tally(), "walls": [], "by_round": []}
             for name in APPS for clients in CLIENTS}
    with ExitStack() as stack:
        apps = [stack.enter_context(running(name, folder)) for name in APPS]  # one after the other
        backends, scores = {}, {}
        for app in apps:
            match = re.search(r"/predict with (\S+?),", app.server.log_text())
            backends[app.name] = match.group(1) if match else "?"
            if app.name != BASELINE and backends[app.name] != "onnxruntime-int8":
                print(f"WARNING: {app.name} serves with {backends[app.name]}, not the fast path")
            app.pause(False)
            scores[app.name] = reference_scores(app)
            app.pause(True)
        for round_index in range(rounds):
            for clients in CLIENTS:
                for app in apps:
                    cell = cells[app.name, clients]
                    answered = len(cell["tally"].answers)
                    app.pause(False)
                    cell["walls"].append(run_clients(app.server.url, clients, requests, cell["tally"], warmup=WARMUP))
                    app.pause(True)
                    cell["by_round"].append((len(cell["tally"].answers) - answered) / cell["walls"][-1])
                    print(f"round {round_index + 1}/{rounds}, {app.name}, {clients} client(s): "
                          f"{cell['by_round'][-1]:.1f} images/s", flush=True)
        apps[-1].pause(False)
        print(f"{FAST}: /predict_batch vs one-file /predict calls ...", flush=True)
        batch = measure_batch_endpoint(apps[-1], rounds * (1 if args.quick else 5))

    results = {}
    for (name, clients), cell in cells.items():
        results.setdefault(name, {})[clients] = {
            "clients": clients, "rounds": rounds, **cell["tally"].summary(sum(cell["walls"])),
            "images_per_s_by_round": cell["by_round"]}
    data = {"args": vars(args), "model": str(folder), "requests_per_client": requests,
            "rounds": rounds, "predict_batch": batch,
            "apps": {app.name: {"env": APPS[app.name], "backend": backends[app.name], "startup_s": app.server.startup_s,
                                "example_scores": scores[app.name], "results": list(results[app.name].values())}
                     for app in apps}}

    base, fast = results[BASELINE], results[FAST]
    rows = [[name, clients, result["answered"], result["error_count"], result["images_per_s"],
             f"{result['images_per_s'] / base[clients]['images_per_s']:.2f}x",
             " / ".join(f"{value:.0f}" for value in result["images_per_s_by_round"]), result["p50_ms"],
             result["p95_ms"], f"{result['p95_ms'] / base[clients]['p95_ms']:.2f}x"]
            for name, by_clients in results.items() for clients, result in by_clients.items()]
    throughput = fast[8]["images_per_s"] / base[8]["images_per_s"]
    latency = fast[1]["p95_ms"] / base[1]["p95_ms"]
    verdicts = [verdict(f"8 clients: {FAST} {fast[8]['images_per_s']:.1f} images/s vs "
                        f"{base[8]['images_per_s']:.1f} = {throughput:.2f}x (goal >= 2x)", throughput >= 2),
                verdict(f"1 client: {FAST} p95 {fast[1]['p95_ms']:.0f} ms vs {base[1]['p95_ms']:.0f} ms "
                        f"= {latency:.2f}x (goal <= 1.20x)", latency <= 1.2)]
    errors = sum(result["error_count"] for by_clients in results.values() for result in by_clients.values())
    verdicts.append(verdict(f"failed requests: {errors}", errors == 0))
    for name in list(APPS)[1:]:
        difference = max(abs(scores[name][example][0] - p) for example, (p, _) in scores[BASELINE].items())
        flips = [example for example, (_, label) in scores[BASELINE].items() if scores[name][example][1] != label]
        verdicts.append(verdict(
            f"{name} vs {BASELINE} on the {len(EXAMPLES)} examples: max |Δp| {difference:.4f} (tolerance "
            f"{PROBABILITY_TOLERANCE}), decisions changed: {len(flips)}"
            + (f" ({', '.join(flips)}: check that the baseline p is within the tolerance of the threshold)"
               if flips else ""), difference <= PROBABILITY_TOLERANCE))
    one_file, batch_rate = (batch["images_per_s"][way] for way in ("/predict, one file a call", "/predict_batch"))
    verdicts += [
        verdict(f"/predict_batch {batch_rate:.1f} images/s vs one-file /predict {one_file:.1f} = "
                f"{batch_rate / one_file:.1f}x (goal >= 5x)", batch_rate >= 5 * one_file),
        verdict(f"/predict_batch answers differing from /predict's: {batch['mismatch_count']}",
                not batch["mismatch_count"])]
    write_results("api_throughput", args, data, [
        section(f"/predict through gradio_client ({rounds} round(s) x {requests} requests per client, "
                f"examples/*.jpeg, model `{folder.name}`)",
                ["app", "clients", "answered", "errors", "images/s", "vs baseline", "images/s by round", "p50 ms",
                 "p95 ms", "p95 vs baseline"], rows),
        section("Start-up (seconds to the first answer of /gradio_api/info)",
                ["app", "environment", "/predict backend", "start-up s"],
                [[app.name, " ".join(f"{k}={v}" for k, v in APPS[app.name].items()), backends[app.name],
                  app.server.startup_s] for app in apps]),
        section(f"/predict_batch vs one-file /predict calls ({FAST}, one client, {len(batch['files'])} files a "
                f"set, {batch['refused']} of them refused)", ["way", "images/s", "calls", "p50 s a set", "p95 s a set"],
                [[way, batch["images_per_s"][way], times["n"], times["p50_ms"] / 1000, times["p95_ms"] / 1000]
                 for way, times in batch["seconds_per_call"].items()]),
    ], verdicts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
