"""API under load: requests queued one at a time against dynamic batching, in one run.

    .venv/bin/python bench/api_load.py                  # embedded model, 16 clients, 32 requests per mode
    .venv/bin/python bench/api_load.py --clients 16 --requests 48 --max_tokens 64 --max_batch_size 16

Starts two openai_api.py servers on 127.0.0.1 with the same model: one with --max_batch_size 1
(queued: one generation at a time, as the server answered before batching) and one with
--max_batch_size N (batched). --clients concurrent clients send greedy chat completions (temperature
0, --max_tokens) for the held-out SFT questions (data/sft/eval), each client one request after
another, to one server at a time: the modes take turns in --rounds rounds of --requests / --rounds
requests each (so a machine whose load changes during the run weighs on both alike), and a mode
stops starting requests once it has spent --max_seconds. Prints, for each mode, generated tokens per
second (completion tokens of all its answers / its wall time), p50 and p95 latency, the ratio, and
how many answers were identical in both modes (greedy answers do not depend on batching).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str | None, max_batch_size: int, window_ms: float, max_tokens: int, threads: int) -> tuple:
    import httpx

    port = free_port()
    command = [sys.executable, str(ROOT / "openai_api.py"), "--port", str(port), "--max_batch_size",
               str(max_batch_size), "--batch_window_ms", str(window_ms), "--max_tokens_limit", str(max_tokens)]
    if model:
        command += ["--base_model", model]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 300
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"openai_api.py exited early:\n{process.stdout.read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                threading.Thread(target=process.stdout.read, daemon=True).start()  # keep its pipe drained
                return process, f"http://127.0.0.1:{port}/v1/chat/completions"
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("openai_api.py did not come up in 300 s")


def load(url: str, questions: list[list[dict]], numbers: range, seconds: float, args) -> dict:
    """--clients clients, each sending requests one after another: results by request number."""
    import httpx

    counter, lock, results = iter(numbers), threading.Lock(), {}
    clients = [httpx.Client(timeout=args.max_seconds + 600) for _ in range(args.clients)]  # made before the clock runs
    start = threading.Barrier(args.clients)
    stop_at = time.perf_counter() + seconds

    def client(http: httpx.Client) -> None:
        start.wait()
        with http:
            while time.perf_counter() < stop_at:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                started = time.perf_counter()
                reply = http.post(url, json={"messages": questions[index % len(questions)], "temperature": 0,
                                             "max_tokens": args.max_tokens})
                reply.raise_for_status()
                body = reply.json()
                results[index] = (time.perf_counter() - started, body["usage"]["completion_tokens"],
                                  body["choices"][0]["message"]["content"])

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
        for future in [pool.submit(client, http) for http in clients]:
            future.result()
    return {"seconds": time.perf_counter() - started, "results": results}


def merge(total: dict | None, run: dict) -> dict:
    if total is None:
        return run
    return {"seconds": total["seconds"] + run["seconds"], "results": {**total["results"], **run["results"]}}


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Model folder (default: the embedded model).")
    parser.add_argument("--clients", type=int, default=16, help="Concurrent clients (1-256).")
    parser.add_argument("--requests", type=int, default=32, help="Requests per mode (1-10000).")
    parser.add_argument("--max_tokens", type=int, default=64, help="max_tokens of every request (1-1024).")
    parser.add_argument("--max_batch_size", type=int, default=16, help="The batched mode's --max_batch_size (2-256).")
    parser.add_argument("--batch_window_ms", type=float, default=50.0, help="The batched mode's --batch_window_ms.")
    parser.add_argument("--rounds", type=int, default=2, help="Turns each mode takes (1-20).")
    parser.add_argument("--threads", type=int, default=0,
                        help="OMP_NUM_THREADS of the servers (0: torch's default, one per core). On a machine busy "
                        "with other work, 1 avoids threads waiting on each other.")
    parser.add_argument("--max_seconds", type=float, default=300.0,
                        help="A mode starts no request after it has run this many seconds in all (10-3600).")
    args = parser.parse_args()
    for flag, value, low, high in (("--clients", args.clients, 1, 256), ("--requests", args.requests, 1, 10000),
                                   ("--max_tokens", args.max_tokens, 1, 1024),
                                   ("--max_batch_size", args.max_batch_size, 2, 256),
                                   ("--max_seconds", args.max_seconds, 10, 3600), ("--rounds", args.rounds, 1, 20),
                                   ("--threads", args.threads, 0, 256),
                                   ("--batch_window_ms", args.batch_window_ms, 0, 10000)):
        if not low <= value <= high:
            parser.error(f"{flag} {value}: must be between {low} and {high}.")

    from medgpt.data_files import find_data_files, qa_reader

    questions = [item["messages"] for _, item in qa_reader(find_data_files(str(ROOT / "data/sft/eval"), None,
                                                                           (".jsonl",), "eval"))]
    import httpx

    modes = {"queued (--max_batch_size 1)": 1, f"batched (--max_batch_size {args.max_batch_size})": args.max_batch_size}
    servers = {}
    try:
        for name, size in modes.items():
            servers[name] = start_server(args.model, size, args.batch_window_ms, args.max_tokens, args.threads)
            httpx.post(servers[name][1], json={"messages": questions[0], "max_tokens": 4, "temperature": 0},
                       timeout=300)  # warm-up
        runs = dict.fromkeys(modes)
        share = -(-args.requests // args.rounds)
        for first in range(0, args.requests, share):
            for name in modes:
                spent = runs[name]["seconds"] if runs[name] else 0.0
                if spent < args.max_seconds:
                    numbers = range(first, min(first + share, args.requests))
                    runs[name] = merge(runs[name], load(servers[name][1], questions, numbers,
                                                        args.max_seconds - spent, args))
        batches = httpx.get(servers[list(modes)[1]][1].replace("/v1/chat/completions", "/health")).json()["batches"]
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=60)

    threads = f"OMP_NUM_THREADS={args.threads}" if args.threads else "torch's default threads"
    print(f"\n{args.clients} concurrent clients, greedy, max_tokens {args.max_tokens}, {os.cpu_count()} CPU cores, "
          f"{threads} (load average at the end {os.getloadavg()[0]:.1f})\n")
    print(f"{'mode':<32}{'requests':>9}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}{'p50 s':>8}{'p95 s':>8}")
    rates = []
    for name, run in runs.items():
        results = run["results"].values()
        latencies = [latency for latency, _, _ in results]
        tokens = sum(count for _, count, _ in results)
        rates.append(tokens / run["seconds"])
        print(f"{name:<32}{len(latencies):>9}{tokens:>8}{run['seconds']:>9.1f}{rates[-1]:>10.1f}"
              f"{percentile(latencies, 0.5):>8.2f}{percentile(latencies, 0.95):>8.2f}")
    queued, batched = (run["results"] for run in runs.values())
    both = sorted(set(queued) & set(batched))
    same = sum(queued[i][2] == batched[i][2] for i in both)
    print(f"\nbatched / queued: {rates[1] / rates[0]:.2f}x generated tokens/s; "
          f"answers identical in both modes: {same}/{len(both)}")
    if len(both) < args.requests:
        print(f"(--max_seconds {args.max_seconds:g} ended a mode before {args.requests} requests)")
    print(f"median answer length: {statistics.median(c for _, c, _ in batched.values()):.0f} tokens; batches of the "
          f"batched mode (size: count, warm-up included): {batches}")


if __name__ == "__main__":
    main()
