"""API throughput: the real app (`python app.py`) called by concurrent gradio_client clients.

    python -m benchmarks.api_throughput                 # full run, about 5 minutes on 2 quiet cores
    python -m benchmarks.api_throughput --quick         # smoke run, about 1 minute
    python -m benchmarks.api_throughput --model runs/smoke   # another model (default: $MODEL_ID, else the bundled one)

Each configuration is the same app.py in its own process, with the switches app.py documents:
- "unbatched, torch fp32" (the baseline of every ratio): PNEUMONIA_VIT_FAST=0 PNEUMONIA_VIT_BATCH=0,
  the app as it was before the fast path and batching: each request scored on its own by the fp32
  PyTorch model, at most 2 at a time;
- "unbatched, fast": PNEUMONIA_VIT_FAST=1 PNEUMONIA_VIT_BATCH=0, to tell the two changes apart
  (--skip-unbatched-fast leaves it out);
- "batched, fast", the default app: PNEUMONIA_VIT_FAST=1 PNEUMONIA_VIT_BATCH=8 (--max-batch).
All apps are started first and stay up. Then, for 1, 4 and 8 clients (--clients), each app is
measured in turn, and the whole sweep is repeated (--rounds, default 2), so that load changes on the
machine hit every app alike; the rounds are pooled. The apps not being measured are paused with
SIGSTOP: an idle gradio server still wakes up every millisecond, about 6 % of a core.

A client is a thread with its own `gradio_client.Client`, created and warmed up (2 requests) before
timing; it then sends --requests (default 100) /predict calls one after the other, cycling through
examples/*.jpeg. Reported: images/s (answers / wall time from the first request sent to the last
answer), p50 / p95 round-trip latency of single calls, and the mean batch size the app logged.
The clients run on the same machine and take CPU from the app; ratios, not absolute numbers, are the
result. Two things of gradio_client's own shape the numbers:
- clients are made with `ssl_verify=False` (plain http to 127.0.0.1, nothing to verify): with the
  default, gradio_client builds a TLS context, CA bundle included, for each of the several HTTP
  requests of a call, about 70 ms of client CPU per call, and the clients, not the app, would be
  what is measured;
- gradio_client polls for the result every 50 ms, so one client's round trip is about 60 ms whatever
  the app does, and 1-client latency hardly tells the configurations apart.

Goals (issue 5): at 8 clients at least 2x the images/s of the baseline, and p95 at 1 client at most
20 % above the baseline's; no failed request.

/predict_batch against one-file /predict calls (issue 29), on the default app, one client: the same
BATCH_FILES files (the pediatric examples, the adult one and test-split films of both classes) sent
as one-file /predict calls one after the other, then as one /predict_batch call, interleaved, --rounds x
--batch-calls times each; images/s of each, and every file's answer compared (label and
confidences, or the refusal). Goal: /predict_batch >= 5x the images/s of one-file calls, the same answers. Also reported: the fast apps' probabilities on the
examples against the baseline's (tolerance 0.02, as tests/test_fast_path.py) and any decision
that changed.
Results: benchmarks/results/api_throughput.{json,md} (api_throughput-quick.* with --quick); the
apps' logs of the last run: ~/.cache/pneumonia-vit-bench/api-logs/.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.harness import (
    REPO,
    SCRATCH,
    SHARED_DATA,
    bundled_dir,
    labelled_files,
    markdown_table,
    percentiles,
    spread,
    verdict,
    write_results,
)
from tests.app_server import RunningApp, running_app

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

# /predict refuses the adult example (no diagnosis outside the domain): the load is the children's films.
EXAMPLES = sorted(path for path in (REPO / "examples").glob("*.jpeg") if not path.name.startswith("adult_"))
BATCH_FILES = 32  # /predict_batch's limit (serving/webapp.py MAX_BATCH_FILES)
BASELINE = "unbatched, torch fp32"
BATCHED = "batched, fast"
PROBABILITY_TOLERANCE = 0.02  # tests/test_fast_path.py
LOG_DIR = SCRATCH / "api-logs"  # the apps' logs of the last run
BATCH_LOG = re.compile(r"predict \S* p=\S+ \S+ in \d+ ms(?: \(batch of (\d+)\))?")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few requests per client (a smoke run)")
    parser.add_argument("--model", default=os.environ.get("MODEL_ID"),
                        help="MODEL_ID for the apps (default: $MODEL_ID, else models/pneumonia-vit-tiny, or a random "
                             "model of its architecture until that exists)")
    parser.add_argument("--clients", default="1,4,8", help="concurrent clients, comma-separated")
    parser.add_argument("--requests", type=int, default=None, help="requests per client (default 100; --quick 5)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="times the whole sweep is repeated, pooled in the results (default 2; --quick 1)")
    parser.add_argument("--max-batch", type=int, default=8, help="PNEUMONIA_VIT_BATCH of the batched app")
    parser.add_argument("--skip-unbatched-fast", action="store_true", help="only the baseline and the batched app")
    parser.add_argument("--batch-calls", type=int, default=None,
                        help="/predict_batch calls (and as many sets of one-file calls) per round (default 5; --quick 1)")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    return parser.parse_args(argv)


@dataclass
class App:
    name: str
    env: dict
    server: RunningApp | None = field(default=None, repr=False)
    pausable: bool = False  # only once launch() has finished its own start-up requests

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def startup_s(self) -> float:
        return self.server.startup_s

    def log_text(self) -> str:
        return self.server.log_text() if self.server else ""

    def pause(self, paused: bool) -> None:
        """SIGSTOP / SIGCONT (POSIX; elsewhere the idle apps keep running)."""
        process = self.server.process if self.server else None
        if self.pausable and process is not None and process.poll() is None and hasattr(signal, "SIGSTOP"):
            process.send_signal(signal.SIGSTOP if paused else signal.SIGCONT)


@contextmanager
def running(app: App, model: str, log_dir: Path, timeout: float):
    """`python app.py` with `app.env` (tests/app_server.py's `running_app`); stops it after."""
    log_path = log_dir / (re.sub(r"[^a-z0-9]+", "_", app.name) + ".log")
    print(f"{app.name}: starting (log {log_path})", flush=True)
    with running_app(model, log_path, timeout, env=app.env) as server:
        app.server = server
        print(f"{app.name}: up in {app.startup_s:.1f} s at {app.url}", flush=True)
        # launch() still requests its own URL after the server answers; a process stopped then
        # fails that check and exits. Gradio prints this line once the check has passed.
        settle = time.perf_counter() + 30
        while "To create a public link" not in app.log_text() and time.perf_counter() < settle:
            time.sleep(0.2)
        app.pausable = "To create a public link" in app.log_text()
        if not app.pausable:
            print(f"note: {app.name} is not paused between its measurements (no launch message in its log)")
        try:
            yield app
        finally:
            app.pause(False)


def p_pneumonia(value: dict) -> float:
    return {item["label"]: item["confidence"] for item in value["confidences"]}["PNEUMONIA"]


def reference_scores(app: App) -> dict[str, tuple[float, str]]:
    """Each example once, one request at a time: (P(PNEUMONIA), label)."""
    from gradio_client import Client, handle_file

    client = Client(app.url, verbose=False, ssl_verify=False)
    scores = {}
    for path in EXAMPLES:
        value = client.predict(handle_file(str(path)), api_name="/predict")
        scores[path.name] = (p_pneumonia(value), value["label"])
    return scores


def measure(app: App, clients: int, requests: int) -> dict:
    """`clients` threads, each its own Client, `requests` sequential /predict calls each."""
    from gradio_client import Client, handle_file

    files = [handle_file(str(path)) for path in EXAMPLES]
    barrier = threading.Barrier(clients + 1)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    finished = [0.0] * clients

    def client_thread(index: int) -> None:
        try:
            client = Client(app.url, verbose=False, ssl_verify=False)
            for i in range(2):  # warm-up: connection, upload path, first batch
                client.predict(files[(index + i) % len(files)], api_name="/predict")
        except Exception as error:  # noqa: BLE001
            errors.append(f"client {index} warm-up: {type(error).__name__}: {error}")
            barrier.abort()
            return
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return
        for i in range(requests):
            start = time.perf_counter()
            try:
                value = client.predict(files[(index * 3 + i) % len(files)], api_name="/predict")
                if value.get("label") not in ("NORMAL", "PNEUMONIA"):
                    raise ValueError(f"unexpected answer {value!r}")
            except Exception as error:  # noqa: BLE001
                errors.append(f"client {index} request {i}: {type(error).__name__}: {error}")
                continue
            latencies[index].append(time.perf_counter() - start)
        finished[index] = time.perf_counter()

    threads = [threading.Thread(target=client_thread, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    try:
        barrier.wait(timeout=300)
    except threading.BrokenBarrierError:
        raise RuntimeError(f"{app.name}: clients failed to start: {errors}") from None
    begin = time.perf_counter()
    log_offset = len(app.log_text())  # after the warm-ups
    for thread in threads:
        thread.join()
    wall = max(finished) - begin if any(finished) else float("nan")
    return {
        "clients": clients, "requests": clients * requests, "wall_s": wall, "errors": errors,
        "latencies_s": [t for times in latencies for t in times],
        "batch_sizes": [int(size or 1) for size in BATCH_LOG.findall(app.log_text()[log_offset:])],
    }


def batch_files() -> list[Path]:
    """BATCH_FILES files: the examples (the adult one too) and test-split films spread over both classes."""
    examples = sorted((REPO / "examples").glob("*.jpeg"))
    test_split = SHARED_DATA / "chest_xray_224" / "test"
    films = [path for path, _ in spread(labelled_files(test_split), BATCH_FILES)] if test_split.is_dir() else []
    return (examples + films + examples * BATCH_FILES)[:BATCH_FILES]


def one_file_answer(client, file) -> dict:
    """/predict's answer in /predict_batch's shape: the label and confidences, or the refusal."""
    from gradio_client.exceptions import AppError

    try:
        return client.predict(file, api_name="/predict")
    except AppError as error:
        return {"error": error.message}


def measure_batch_endpoint(app: App, rounds: int, calls: int) -> dict:
    """One client: the files as one-file /predict calls, then as one /predict_batch call, `calls` times
    each per round, interleaved; every answer of one way compared with the other's."""
    from gradio_client import Client, handle_file

    paths = batch_files()
    files = [handle_file(str(path)) for path in paths]
    client = Client(app.url, verbose=False, ssl_verify=False)
    client.predict(files[:2], api_name="/predict_batch")  # warm-up
    one_file_answer(client, files[0])
    seconds = {"/predict, one file a call": [], "/predict_batch": []}
    mismatches = []
    for _ in range(rounds * calls):
        start = time.perf_counter()
        singles = [one_file_answer(client, file) for file in files]
        seconds["/predict, one file a call"].append(time.perf_counter() - start)
        start = time.perf_counter()
        batched = client.predict(files, api_name="/predict_batch")
        seconds["/predict_batch"].append(time.perf_counter() - start)
        for path, single, answer in zip(paths, singles, batched):
            same = ({key: answer.get(key) for key in single} == single and answer["file"] == path.name)
            if not same:
                mismatches.append({"file": path.name, "predict": single, "predict_batch": answer})
    return {"files": [path.name for path in paths], "refused": sum("error" in answer for answer in singles),
            "mismatches": mismatches[:10], "mismatch_count": len(mismatches),
            "images_per_s": {way: len(files) * len(times) / sum(times) for way, times in seconds.items()},
            "seconds_per_call": {way: percentiles(times) for way, times in seconds.items()}}


def batch_report(batch: dict) -> tuple[str, list[str]]:
    """The /predict_batch section's Markdown and goal lines."""
    one_file, batched = (batch["images_per_s"][way] for way in ("/predict, one file a call", "/predict_batch"))
    markdown = (f"### /predict_batch vs one-file /predict calls ({BATCHED}, one client, {len(batch['files'])} files a "
                f"set, {batch['refused']} of them refused)\n\n" + markdown_table(
                    ["way", "images/s", "calls", "p50 s a set", "p95 s a set"],
                    [[way, batch["images_per_s"][way], times["n"], times["p50_ms"] / 1000, times["p95_ms"] / 1000]
                     for way, times in batch["seconds_per_call"].items()]))
    return markdown, [
        verdict(f"/predict_batch {batched:.1f} images/s vs one-file /predict {one_file:.1f} = {batched / one_file:.1f}x "
                "(goal >= 5x)", batched >= 5 * one_file),
        verdict(f"/predict_batch answers differing from /predict's: {batch['mismatch_count']}", not batch["mismatch_count"]),
    ]


def summary(runs: list[dict]) -> dict:
    """One (app, clients) cell over all rounds: images/s = answers / summed wall time."""
    every = [t for run in runs for t in run["latencies_s"]]
    sizes = [size for run in runs for size in run["batch_sizes"]]
    wall = sum(run["wall_s"] for run in runs)
    return {
        "clients": runs[0]["clients"], "rounds": len(runs), "answered": len(every),
        "error_count": sum(len(run["errors"]) for run in runs), "errors": [e for run in runs for e in run["errors"]][:10],
        "wall_s": wall, "images_per_s": len(every) / wall if wall > 0 else float("nan"),
        "images_per_s_by_round": [len(run["latencies_s"]) / run["wall_s"] for run in runs if run["wall_s"] > 0],
        **(percentiles(every) if every else {"p50_ms": float("nan"), "p95_ms": float("nan")}),
        "mean_batch_size": sum(sizes) / len(sizes) if sizes else None,
        "max_batch_size": max(sizes) if sizes else None,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    requests = args.requests or (5 if args.quick else 100)
    rounds = args.rounds or (1 if args.quick else 2)
    client_counts = [int(count) for count in args.clients.split(",")]
    folder, trained = bundled_dir(args.model)
    model = str(folder)
    apps = [App(BASELINE, {"PNEUMONIA_VIT_FAST": "0", "PNEUMONIA_VIT_BATCH": "0"})]
    if not args.skip_unbatched_fast:
        apps.append(App("unbatched, fast", {"PNEUMONIA_VIT_FAST": "1", "PNEUMONIA_VIT_BATCH": "0"}))
    apps.append(App(BATCHED, {"PNEUMONIA_VIT_FAST": "1", "PNEUMONIA_VIT_BATCH": str(args.max_batch)}))

    data: dict = {"args": vars(args), "model": model, "trained": trained, "requests_per_client": requests,
                  "rounds": rounds, "apps": {}}
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    raw: dict[tuple[str, int], list[dict]] = {}
    with ExitStack() as stack:
        for app in apps:  # one after the other: start-up times are not measured against each other
            stack.enter_context(running(app, model, LOG_DIR, args.startup_timeout))
            app.pause(True)
        backends = {}
        for app in apps:
            match = re.search(r"/predict with (\S+?),", app.log_text())
            backends[app.name] = match.group(1) if match else "?"
            if app.name != BASELINE and backends[app.name] != "onnxruntime-int8":
                print(f"WARNING: {app.name} serves with {backends[app.name]}, not the fast path (see {app.log_path})")
        scores = {}
        for app in apps:
            app.pause(False)
            scores[app.name] = reference_scores(app)
            app.pause(True)
        for round_index in range(rounds):
            for clients in client_counts:
                for app in apps:  # interleaved: load changes on the machine hit every app alike
                    app.pause(False)
                    print(f"round {round_index + 1}/{rounds}, {app.name}: {clients} client(s) x {requests} requests ...",
                          flush=True)
                    run = measure(app, clients, requests)
                    app.pause(True)
                    raw.setdefault((app.name, clients), []).append(run)
                    done = summary([run])
                    print(f"  {done['images_per_s']:.1f} images/s, p50 {done['p50_ms']:.0f} ms, p95 {done['p95_ms']:.0f} ms, "
                          f"mean batch {done['mean_batch_size'] or 1:.2f}, {done['error_count']} errors", flush=True)
        batched_app = apps[-1]
        batched_app.pause(False)
        print(f"{BATCHED}: /predict_batch vs one-file /predict calls ...", flush=True)
        data["predict_batch"] = measure_batch_endpoint(batched_app, rounds, args.batch_calls or (1 if args.quick else 5))
    results = {app.name: [summary(raw[(app.name, clients)]) for clients in client_counts] for app in apps}
    for app in apps:
        data["apps"][app.name] = {"env": app.env, "backend": backends[app.name], "startup_s": app.startup_s,
                                  "example_scores": scores[app.name], "results": results[app.name]}

    base = {result["clients"]: result for result in results[BASELINE]}
    rows = []
    for app in apps:
        for result in results[app.name]:
            reference = base[result["clients"]]
            rows.append([app.name, result["clients"], result["answered"], result["error_count"], result["images_per_s"],
                         f"{result['images_per_s'] / reference['images_per_s']:.2f}x",
                         " / ".join(f"{value:.0f}" for value in result["images_per_s_by_round"]),
                         result["p50_ms"], result["p95_ms"], f"{result['p95_ms'] / reference['p95_ms']:.2f}x",
                         f"{result['mean_batch_size']:.2f}" if result["mean_batch_size"] else "-"])
    verdicts = []
    batched = {result["clients"]: result for result in results[BATCHED]}
    if 8 in base and 8 in batched:
        ratio = batched[8]["images_per_s"] / base[8]["images_per_s"]
        verdicts.append(f"8 clients: {BATCHED} {batched[8]['images_per_s']:.1f} images/s vs {base[8]['images_per_s']:.1f} "
                        f"= {ratio:.2f}x (goal >= 2x) -> {'PASS' if ratio >= 2 else 'FAIL'}")
    if 1 in base and 1 in batched:
        ratio = batched[1]["p95_ms"] / base[1]["p95_ms"]
        verdicts.append(f"1 client: {BATCHED} p95 {batched[1]['p95_ms']:.0f} ms vs {base[1]['p95_ms']:.0f} ms "
                        f"= {ratio:.2f}x (goal <= 1.20x) -> {'PASS' if ratio <= 1.2 else 'FAIL'}")
    errors = sum(result["error_count"] for by_app in results.values() for result in by_app)
    verdicts.append(f"failed requests: {errors} -> {'PASS' if errors == 0 else 'FAIL'}")
    for app in apps:
        if app.name == BASELINE:
            continue
        differences = [abs(scores[app.name][name][0] - p) for name, (p, _) in scores[BASELINE].items()]
        flips = [name for name, (p, label) in scores[BASELINE].items() if scores[app.name][name][1] != label]
        verdicts.append(f"{app.name} vs {BASELINE} on the {len(EXAMPLES)} examples: max |Δp| {max(differences):.4f} "
                        f"(tolerance {PROBABILITY_TOLERANCE}), decisions changed: {len(flips)}"
                        + (f" ({', '.join(flips)}: check that the baseline p is within the tolerance of the threshold)"
                           if flips else "") + f" -> {'PASS' if max(differences) <= PROBABILITY_TOLERANCE else 'FAIL'}")
    batch_markdown, batch_verdicts = batch_report(data["predict_batch"])
    data["verdicts"] = verdicts = verdicts + batch_verdicts
    markdown = "\n\n".join([
        f"### /predict through gradio_client ({rounds} round(s) x {requests} requests per client, examples/*.jpeg, "
        f"model `{Path(model).name}`{'' if trained else ', random weights'})\n\n"
        + markdown_table(["app", "clients", "answered", "errors", "images/s", "vs baseline", "images/s by round",
                          "p50 ms", "p95 ms", "p95 vs baseline", "mean batch"], rows),
        "### Start-up (seconds to the first answer of /gradio_api/info)\n\n" + markdown_table(
            ["app", "environment", "/predict backend", "start-up s"],
            [[app.name, " ".join(f"{k}={v}" for k, v in app.env.items()), backends[app.name], app.startup_s] for app in apps]),
        batch_markdown,
        "### Goals\n\n" + "\n".join(f"- {line}" for line in verdicts),
    ])
    write_results("api_throughput", args.quick, data, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
