"""`internvlx serve` under load and abuse: 32 well-behaved clients alone, then with 8 hostile ones at once.

Hypothesis: with every request bounded (images per request in pixels and bytes, the text against the context, the
JSON values of a body, a fetch's deadline headers included), the CPU work off the event loop and a bounded number of
requests decoding images at once, hostile clients cost the well-behaved ones a bounded slowdown (their p50 / p95
latency at most a few times the latency alone), never an error: no 5xx, no descriptor left open, ``/health``
answering within a second throughout, and the resident memory bounded by the decode slots rather than by the number
of hostile clients.

One server (`python -m internvlx_hf serve`, the packaged demo model, default limits, a media folder and 127.0.0.1 as
an allowed media host) and, in this process, a host on 127.0.0.1 that sends its status line and headers a byte every
0.09 s. Phase 1: 32 clients ask the demo's questions (a 112 x 112 PNG as a data: URI each, greedy, 8 tokens at most)
for ``--alone`` seconds. Phase 2: the same 32 clients and 8 hostile ones for ``--seconds``; each hostile client
cycles through the attacks of the attack run (issue 50): two and three solid 36-megapixel PNGs (1.3 MB bodies; two
are decoded and answered, three exceed --max-request-pixels), a URL on the trickling host (cut at
--media-fetch-timeout), a folder inside the allowed folder and paths outside it, 40 MB of JSON numbers, a 1.9 MB
text, broken JSON, a body that is no UTF-8, deep nesting. Throughout, ``/health`` is polled every 0.25 s and the
server's resident memory sampled every 0.2 s; its open descriptors are counted before phase 1 and after phase 2.
The server admits --max-active-generations + --max-waiting-requests requests (4 + 16) and answers the others 503 with
``Retry-After`` (the queue is full): a well-behaved client waits as told and asks again (counted, not timed); a
hostile client's 503s are listed with its other answers.

    /work/coord/heavy python benchmarks/bench_serve_abuse.py            # 60 s alone, 180 s with the hostile clients

Results: `benchmarks/results/serve-abuse.json` (every number) and `serve-abuse.md` (the table of
experiments/serve-abuse/README.md).

``--bounds`` (issue 58) runs three other measurements instead, on one server started with an open-file limit of
1024 (default limits otherwise): 1,100 connections that send nothing (``/health``'s latency while they are open and
after they are dropped, the server's descriptors, "Too many open files" in its log); a 2-token request sent behind
three requests of ``max_tokens`` 3800 (the demo model kept from ending its answer with ``logit_bias``), its latency;
and the resident memory before, during and 5 s after a burst of six requests of two 36-megapixel PNGs (three at once).

    python benchmarks/bench_serve_abuse.py --bounds --name serve-abuse-bounds
    PYTHONPATH=/path/to/old/src python benchmarks/bench_serve_abuse.py --bounds --name serve-abuse-bounds-before

(``serve-abuse-bounds-queue-only`` was run at c9187d7, the bounded queue with one generation at a time; the 2-token
request's latency against the long ones' compares the three.)
"""

from __future__ import annotations

import argparse
import base64
import http.client
import http.server
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from internvlx_hf.bench.harness import environment, write_results, write_text
from internvlx_hf.bench.server_load import percentile as nearest_rank

RESULTS = Path(__file__).resolve().parent / "results"
GOOD_CLIENTS, HOSTILE_CLIENTS = 32, 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0..100); NaN for no values."""
    return nearest_rank(values, q / 100) if values else float("nan")


def post(base: str, body: bytes, timeout: float = 300) -> tuple[int, bytes]:
    status, raw, _ = post_with_retry_after(base, body, timeout)
    return status, raw


def post_with_retry_after(base: str, body: bytes, timeout: float = 300) -> tuple[int, bytes, float | None]:
    """``(status, body, Retry-After seconds or None)``."""
    connection = http.client.HTTPConnection(base.removeprefix("http://"), timeout=timeout)
    try:
        connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        retry_after = response.getheader("Retry-After")
        return response.status, response.read(), float(retry_after) if retry_after else None
    finally:
        connection.close()


class Trickle(http.server.BaseHTTPRequestHandler):
    """A host on an allowed domain that sends its status line and headers a byte every 0.09 s, for a minute."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Slow: " + b"a" * 1000
        try:
            for index in range(len(head)):
                self.wfile.write(head[index:index + 1])
                self.wfile.flush()
                time.sleep(0.09)
        except OSError:  # the server under test gave up (its fetch deadline): expected
            pass
        self.close_connection = True


def png_data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def hostile_requests(media: Path, trickle: str) -> list[tuple[str, bytes]]:
    """(kind, body) of every attack, in the order each hostile client cycles through them."""
    from PIL import Image

    big = png_data_uri(Image.new("RGB", (6000, 6000), (200, 30, 30)))  # 36 MP, ~100 KB compressed

    def images(urls: list[str], text: str = "What colour?") -> bytes:
        content = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
        return json.dumps({"messages": [{"role": "user", "content": [*content, {"type": "text", "text": text}]}],
                           "max_tokens": 8}).encode()

    numbers = b'{"messages":[{"role":"user","content":"Hi"}],"metadata":{"a":[' + b"0," * (20 * 2**20 - 1) + b"0]}}"
    return [
        ("two 36 MP PNGs", images([big, big])),
        ("three 36 MP PNGs", images([big, big, big])),
        ("trickling host", images([f"{trickle}/slow.png"])),
        ("folder in the allowed folder", images(["sub"])),
        ("paths outside the folder", images(["/etc/passwd", "../../etc/passwd"])),
        ("40 MB of JSON numbers", numbers),
        ("1.9 MB text", json.dumps({"messages": [{"role": "user", "content": "word " * 380_000}]}).encode()),
        ("broken JSON", b'{"messages": [{"role": "user", "content": "Hi"}'),
        ("not UTF-8", b'{"messages": "\xff\xfe\xfd"}'),
        ("deep nesting", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        ("folder itself", images([str(media)])),
    ]


def run(args) -> dict:
    from internvlx_hf.demo import demo_model_dir, demo_samples

    model = str(demo_model_dir())
    samples = demo_samples(seed=0)
    good_bodies = [(json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_uri(sample.image)}},
        {"type": "text", "text": sample.question}]}], "max_tokens": 8, "temperature": 0}).encode(), sample.expected)
        for sample in samples]

    work = Path(tempfile.mkdtemp(prefix="serve-abuse-"))
    media = work / "media"
    (media / "sub").mkdir(parents=True)
    samples[0].image.save(media / "colour.png")
    trickle_host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    trickle_host.daemon_threads = True
    threading.Thread(target=trickle_host.serve_forever, daemon=True).start()
    trickle = f"http://127.0.0.1:{trickle_host.server_address[1]}"
    attacks = hostile_requests(media, trickle)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(work / "server.log", "w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("INTERNVLX_API_KEY", None)
    server = subprocess.Popen([sys.executable, "-m", "internvlx_hf", "serve", model, "--port", str(port),
                               "--log-level", "warning", "--allowed-local-media-path", str(media),
                               "--allowed-media-domains", "127.0.0.1", *args.server_arg], stdout=log,
                              stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start:\n{(work / 'server.log').read_text()}")
                time.sleep(0.5)
        for body, _ in good_bodies:  # warm-up: the worker threads exist, the first generation is done
            post(base, body)
        baseline_rss = rss_mib(server.pid)
        descriptors_before = descriptors(server.pid)
        phases = {}
        for name, seconds, hostile in (("alone", args.alone, 0),
                                       ("with hostile clients", args.seconds, HOSTILE_CLIENTS)):
            phases[name] = phase(base, server.pid, good_bodies, attacks, seconds, hostile)
            print(f"{name}: {json.dumps(phases[name]['summary'])}", flush=True)
        time.sleep(3)  # the connections just closed
        descriptors_after = descriptors(server.pid)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        trickle_host.shutdown()
        log.close()
    alone, hostile = phases["alone"]["summary"], phases["with hostile clients"]["summary"]
    return {
        "settings": {"good_clients": GOOD_CLIENTS, "hostile_clients": HOSTILE_CLIENTS, "alone_s": args.alone,
                     "with_hostile_s": args.seconds, "model": "packaged demo model", "server": "default limits, "
                     "--allowed-local-media-path, --allowed-media-domains 127.0.0.1", "server_args": args.server_arg,
                     "max_tokens": 8,
                     "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), Python "
                                f"{platform.python_version()}"},
        "baseline_rss_mib": round(baseline_rss), "descriptors_before": descriptors_before,
        "descriptors_after": descriptors_after, "phases": phases,
        "ratios": {"p50": round(hostile["good_p50_s"] / alone["good_p50_s"], 2),
                   "p95": round(hostile["good_p95_s"] / alone["good_p95_s"], 2)},
    }


def phase(base: str, pid: int, good_bodies, attacks, seconds: float, hostile: int) -> dict:
    stop = time.monotonic() + seconds
    lock = threading.Lock()
    good: list[tuple[float, bool, int]] = []
    busy: list[float] = []  # a well-behaved client told to come back (503 with Retry-After): when
    bad: dict[str, dict] = {}
    health: list[float] = []
    rss: list[float] = []

    def good_client(number: int) -> None:
        index = number
        while time.monotonic() < stop:
            body, expected = good_bodies[index % len(good_bodies)]
            index += 1
            started = time.monotonic()
            try:
                status, raw, retry_after = post_with_retry_after(base, body)
                right = status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == expected
            except (OSError, ValueError, KeyError):
                status, right, retry_after = 0, False, None
            if status == 503 and retry_after is not None:  # the queue is full: come back when it says
                with lock:
                    busy.append(time.monotonic())
                time.sleep(min(retry_after, max(0.0, stop - time.monotonic())))
                index -= 1
                continue
            with lock:
                good.append((time.monotonic() - started, right, status))

    def hostile_client(number: int) -> None:
        index = number
        while time.monotonic() < stop:
            kind, body = attacks[index % len(attacks)]
            index += 1
            started = time.monotonic()
            try:
                status, _ = post(base, body)
            except OSError:
                status = 0
            with lock:
                entry = bad.setdefault(kind, {"statuses": {}, "seconds": []})
                entry["statuses"][str(status)] = entry["statuses"].get(str(status), 0) + 1
                entry["seconds"].append(time.monotonic() - started)

    def poll_health() -> None:
        while time.monotonic() < stop:
            started = time.monotonic()
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=60) as response:
                    response.read()
            except OSError:
                pass
            health.append(time.monotonic() - started)
            time.sleep(0.25)

    def sample_memory() -> None:
        while time.monotonic() < stop:
            rss.append(rss_mib(pid))
            time.sleep(0.2)

    threads = [threading.Thread(target=good_client, args=(n,)) for n in range(GOOD_CLIENTS)]
    threads += [threading.Thread(target=hostile_client, args=(n,)) for n in range(hostile)]
    threads += [threading.Thread(target=poll_health), threading.Thread(target=sample_memory)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies = [seconds for seconds, _, _ in good]
    statuses = [status for _, _, status in good] + [int(s) for entry in bad.values() for s, n in
                                                    entry["statuses"].items() for _ in range(n)]
    summary = {
        "good_requests": len(good), "good_right": sum(right for _, right, _ in good),
        "good_p50_s": round(statistics.median(latencies), 3), "good_p95_s": round(percentile(latencies, 95), 3),
        "good_per_s": round(len(good) / seconds, 2), "hostile_requests": sum(len(e["seconds"]) for e in bad.values()),
        "status_5xx": sum(1 for status in statuses if status >= 500 and status != 503),
        "status_503_busy": statuses.count(503), "no_answer": statuses.count(0),
        "good_told_to_retry": len(busy),
        "health_worst_s": round(max(health), 3), "health_polls": len(health), "peak_rss_mib": round(max(rss)),
    }
    kinds = {kind: {"statuses": entry["statuses"], "p50_s": round(statistics.median(entry["seconds"]), 2),
                    "max_s": round(max(entry["seconds"]), 2)} for kind, entry in bad.items()}
    return {"summary": summary, "hostile_kinds": kinds}


def table(result: dict) -> str:
    alone, hostile = (result["phases"][name]["summary"] for name in ("alone", "with hostile clients"))
    rows = [
        ("well-behaved requests answered (right answers)", f"{alone['good_requests']} ({alone['good_right']})",
         f"{hostile['good_requests']} ({hostile['good_right']})", ""),
        ("well-behaved p50 latency (s)", alone["good_p50_s"], hostile["good_p50_s"], f"{result['ratios']['p50']}x"),
        ("well-behaved p95 latency (s)", alone["good_p95_s"], hostile["good_p95_s"], f"{result['ratios']['p95']}x"),
        ("hostile requests", "", hostile["hostile_requests"], ""),
        ("5xx answers other than 503 busy", alone["status_5xx"], hostile["status_5xx"], ""),
        ("well-behaved requests told to come back (503 with Retry-After, then retried)",
         alone.get("good_told_to_retry", ""), hostile.get("good_told_to_retry", ""), ""),
        ("`/health` worst latency (s)", alone["health_worst_s"], hostile["health_worst_s"], ""),
        ("peak resident memory (MiB; idle: " + str(result["baseline_rss_mib"]) + ")", alone["peak_rss_mib"],
         hostile["peak_rss_mib"], ""),
    ]
    lines = ["| | 32 clients alone | with 8 hostile clients | ratio |", "|---|---|---|---|"]
    lines += [f"| {name} | {a} | {b} | {c} |" for name, a, b, c in rows]
    lines.append(f"| open descriptors before phase 1 / after phase 2 | {result['descriptors_before']} | "
                 f"{result['descriptors_after']} | |")
    kinds = result["phases"]["with hostile clients"]["hostile_kinds"]
    lines += ["", "| attack | answers (status: count) | p50 / max seconds |", "|---|---|---|"]
    lines += [f"| {kind} | {', '.join(f'{s}: {n}' for s, n in sorted(entry['statuses'].items()))} | "
              f"{entry['p50_s']} / {entry['max_s']} |" for kind, entry in kinds.items()]
    return "\n".join(lines)


SILENT_CONNECTIONS, NOFILE = 1100, 1024
# <|endoftext|> and <|im_end|> banned: the demo model generates to max_tokens
NO_END = {"800": -100, "802": -100}


def timed_health(base: str, timeout: float = 10) -> float | None:
    """Seconds /health took to answer 200 (None: no answer within ``timeout``)."""
    started = time.monotonic()
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=timeout) as response:
            return round(time.monotonic() - started, 3) if response.status == 200 else None
    except OSError:
        return None


def silent_connections(base: str, pid: int) -> dict:
    port = int(base.rpartition(":")[2])
    start = descriptors(pid)
    sockets, refused = [], 0
    for _ in range(SILENT_CONNECTIONS):
        try:
            sockets.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except OSError:
            refused += 1
    time.sleep(1)
    during = [timed_health(base) for _ in range(5)]
    open_during = descriptors(pid)
    for sock in sockets:
        sock.close()
    time.sleep(3)
    after = [timed_health(base) for _ in range(5)]
    return {"connections": SILENT_CONNECTIONS, "connect_failed": refused, "descriptors_start": start,
            "descriptors_during": open_during, "descriptors_after": descriptors(pid),
            "health_during_s": during, "health_after_s": after}


def queued_short_request(base: str) -> dict:
    long_body = json.dumps({"messages": [{"role": "user", "content": "Count to a thousand."}], "max_tokens": 3800,
                            "logit_bias": NO_END, "temperature": 0}).encode()
    short_body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).encode()
    results: dict[str, tuple] = {}

    def send(name: str, body: bytes) -> None:
        started = time.monotonic()
        status, raw = post(base, body, timeout=900)
        answer = json.loads(raw) if status == 200 else {}
        results[name] = (status, round(time.monotonic() - started, 2),
                         answer.get("usage", {}).get("completion_tokens"),
                         (answer.get("choices") or [{}])[0].get("finish_reason"))

    threads = []
    for number in range(3):
        threads.append(threading.Thread(target=send, args=(f"long{number + 1}", long_body)))
        threads[-1].start()
        time.sleep(0.3)
    time.sleep(1)
    threads.append(threading.Thread(target=send, args=("short", short_body)))
    threads[-1].start()
    for thread in threads:
        thread.join()
    return {name: dict(zip(("status", "latency_s", "completion_tokens", "finish_reason"), value))
            for name, value in sorted(results.items())}


def large_image_burst(base: str, pid: int) -> dict:
    from PIL import Image

    big = png_data_uri(Image.new("RGB", (6000, 6000), (200, 30, 30)))
    body = json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": big}}, {"type": "image_url", "image_url": {"url": big}},
        {"type": "text", "text": "What colour?"}]}], "max_tokens": 8}).encode()
    before, peak, statuses, done = rss_mib(pid), 0.0, [], threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_mib(pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    for _ in range(2):
        wave = [threading.Thread(target=lambda: statuses.append(post(base, body)[0])) for _ in range(3)]
        for thread in wave:
            thread.start()
        for thread in wave:
            thread.join()
    done.set()
    sampler.join()
    time.sleep(5)
    return {"requests": len(statuses), "statuses": sorted(statuses), "rss_before_mib": round(before),
            "rss_peak_mib": round(peak), "rss_after_5s_mib": round(rss_mib(pid))}


def run_bounds(args) -> dict:
    import resource

    from internvlx_hf.demo import demo_model_dir

    work = Path(tempfile.mkdtemp(prefix="serve-bounds-"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("INTERNVLX_API_KEY", None)
    with open(work / "server.log", "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "internvlx_hf", "serve", str(demo_model_dir()), "--port", str(port),
             "--log-level", "warning", *args.server_arg], stdout=log, stderr=subprocess.STDOUT, env=env,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE)))
    try:
        deadline = time.monotonic() + 300
        while timed_health(base, 5) is None:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start:\n{(work / 'server.log').read_text()}")
            time.sleep(0.5)
        post(base, json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).encode())
        result = {"silent": silent_connections(base, server.pid)}
        print(json.dumps(result["silent"]), flush=True)
        result["queue"] = queued_short_request(base)
        print(json.dumps(result["queue"]), flush=True)
        result["memory"] = large_image_burst(base, server.pid)
        print(json.dumps(result["memory"]), flush=True)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    text = (work / "server.log").read_text()
    result["log_too_many_open_files"] = text.count("Too many open files")
    result["settings"] = {"model": "packaged demo model", "open_file_limit": NOFILE, "server_args": args.server_arg,
                          "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), Python "
                                     f"{platform.python_version()}"}
    return result


def bounds_table(result: dict) -> str:
    silent, queue, memory = result["silent"], result["queue"], result["memory"]

    def worst(values):
        return "no answer" if None in values else max(values)

    rows = [
        (f"`/health` worst latency with {silent['connections']} silent connections open (s)",
         worst(silent["health_during_s"])),
        ("`/health` worst latency after they are dropped (s)", worst(silent["health_after_s"])),
        ("server descriptors: start / with them open / after", f"{silent['descriptors_start']} / "
         f"{silent['descriptors_during']} / {silent['descriptors_after']}"),
        ("'Too many open files' lines in the log", result["log_too_many_open_files"]),
        ("2-token request behind three of max_tokens 3800: latency (s)", queue["short"]["latency_s"]),
        ("the three long requests: latency (s)", " / ".join(str(queue[f"long{n}"]["latency_s"]) for n in (1, 2, 3))),
        ("resident memory before / peak / 5 s after six requests of two 36 MP PNGs (MiB)",
         f"{memory['rss_before_mib']} / {memory['rss_peak_mib']} / {memory['rss_after_5s_mib']}"),
    ]
    return "\n".join(["| | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)])


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--alone", type=float, default=60, help="seconds of the well-behaved clients alone")
    parser.add_argument("--seconds", type=float, default=180, help="seconds with the hostile clients")
    parser.add_argument("--name", default="serve-abuse", help="results file name (benchmarks/results/NAME.json)")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="one more argument of `internvlx serve` (repeatable), e.g. --server-arg=--max-concurrent-"
                             "decodes=2")
    parser.add_argument("--bounds", action="store_true", help="the connection, queue and memory measurements of issue "
                        "58 instead (see the module's text)")
    args = parser.parse_args()
    result = run_bounds(args) if args.bounds else run(args)
    result["environment"] = environment("cpu")
    RESULTS.mkdir(exist_ok=True)
    write_results(RESULTS / f"{args.name}.json", result)
    text = bounds_table(result) if args.bounds else table(result)
    write_text(RESULTS / f"{args.name}.md", text + "\n")
    print(text)


if __name__ == "__main__":
    main()
