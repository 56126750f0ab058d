"""Response-cache benchmark: hit latency, the cost a miss adds, and a Redis outage under load.

Starts its own redis-server (on a free 127.0.0.1 port) and ``clora serve`` (a child process), then prints:
  1. cache hit, server-side (``clora_request_latency_seconds``, timed by the pipeline from routing on): the share
     of hits under 1 ms and 2 ms (bucket edges, so "p50 <= 2 ms" is exact) and an interpolated p50; and the
     client-observed p50 over loopback;
  2. what a miss adds: p50 of ``get`` (miss) + ``set`` against the same Redis, and against the in-process LRU;
  3. ``--clients`` concurrent clients for ``--duration`` s; Redis is killed at 1/3 and restarted at 2/3;
     every failed request is counted (target: 0).

    python bench/cache.py                            # embedded SmolLM2, 60 s, 16 clients
    python bench/cache.py --base-model DIR --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.response_cache import MemoryCache, RedisCache, cache_key  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(port: int, workdir: str) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found: apt-get install redis-server")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", workdir, "--loglevel", "warning"], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc
        except OSError:
            time.sleep(0.05)
    sys.exit("redis-server did not start")


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)


def latency_buckets(text: str, endpoint: str) -> dict[float, float]:
    out: dict[float, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "clora_request_latency_seconds_bucket" and s.labels.get("endpoint") == endpoint:
                le = float(s.labels["le"])
                out[le] = out.get(le, 0.0) + s.value
    return out


def quantile_from_buckets(delta: dict[float, float], q: float) -> float:
    """Prometheus-style histogram_quantile over cumulative bucket counts."""
    edges = sorted(delta)
    total = delta[edges[-1]]
    rank, prev_edge, prev_count = q * total, 0.0, 0.0
    for edge in edges:
        if delta[edge] >= rank:
            if edge == float("inf"):
                return prev_edge
            span = delta[edge] - prev_count
            return prev_edge + (edge - prev_edge) * ((rank - prev_count) / span if span else 0.0)
        prev_edge, prev_count = edge, delta[edge]
    return prev_edge


async def hit_latency(client: httpx.AsyncClient, n: int) -> None:
    body = {"prompt": "Cache me: what is a low-rank adapter?", "max_tokens": 8, "temperature": 0}
    first = await client.post("/v1/generate", json=body)
    first.raise_for_status()
    before = latency_buckets((await client.get("/metrics")).text, "generate")
    client_ms = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = await client.post("/v1/generate", json=body)
        client_ms.append((time.perf_counter() - t0) * 1e3)
        assert r.status_code == 200 and r.headers.get("x-cache") == "hit", (r.status_code, r.headers)
    after = latency_buckets((await client.get("/metrics")).text, "generate")
    delta = {le: after[le] - before.get(le, 0.0) for le in after}
    under_2ms = delta.get(0.002, 0.0) / delta[float("inf")]
    p50 = quantile_from_buckets(delta, 0.5) * 1e3  # interpolated within its bucket
    verdict = "PASS" if under_2ms >= 0.5 else "FAIL"
    print(f"[1] cache hit, server-side: {under_2ms:.0%} of {n} hits <= 2 ms, "
          f"{delta.get(0.001, 0.0) / delta[float('inf')]:.0%} <= 1 ms, p50 ~ {p50:.2f} ms (bucket-interpolated) "
          f"(target p50 <= 2 ms: {verdict}); client-observed p50 {statistics.median(client_ms):.2f} ms, "
          f"p95 {sorted(client_ms)[int(0.95 * n) - 1]:.2f} ms")


async def miss_cost(redis_url: str, n: int) -> None:
    value = b"x" * 2048
    for name, cache in [("redis", RedisCache(redis_url, 3600, 1_000_000, 0.05)), ("memory", MemoryCache(4096, 1_000_000, 3600))]:
        costs = []
        for i in range(n):
            key = cache_key("fp", "adapter", 1, {"prompt": f"miss {i}", "temperature": 0, "max_tokens": 8})
            t0 = time.perf_counter()
            assert await cache.get(key) is None
            await cache.set(key, value)
            costs.append((time.perf_counter() - t0) * 1e3)
        await cache.close()
        p50 = statistics.median(costs)
        verdict = "PASS" if p50 <= 1.0 else "FAIL"
        print(f"[2] a miss adds (key + get miss + set 2 KiB), {name}: p50 {p50:.3f} ms, "
              f"p95 {sorted(costs)[int(0.95 * n) - 1]:.3f} ms over {n} (target p50 <= 1 ms: {verdict})")


async def outage_load(client: httpx.AsyncClient, clients: int, duration: float, redis_port: int, workdir: str,
                      redis: list[subprocess.Popen[bytes]]) -> None:
    prompts = [f"Question {i}: name a continual-learning method." for i in range(24)]
    stop_at = time.monotonic() + duration
    counts = {"ok": 0, "failed": 0, "hit": 0, "miss": 0}
    failures: list[str] = []

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop_at:
            body = {"prompt": rng.choice(prompts), "max_tokens": 4, "temperature": 0}
            try:
                r = await client.post("/v1/generate", json=body)
                if r.status_code == 200:
                    counts["ok"] += 1
                    counts[r.headers.get("x-cache", "miss")] = counts.get(r.headers.get("x-cache", "miss"), 0) + 1
                else:
                    counts["failed"] += 1
                    failures.append(f"{r.status_code} {r.text[:120]}")
            except httpx.HTTPError as e:
                counts["failed"] += 1
                failures.append(repr(e))

    async def chaos() -> None:
        await asyncio.sleep(duration / 3)
        kill(redis[0])
        print(f"    t={duration / 3:.0f}s: redis-server killed")
        await asyncio.sleep(duration / 3)
        redis[0] = start_redis(redis_port, workdir)
        print(f"    t={2 * duration / 3:.0f}s: redis-server restarted")

    await asyncio.gather(chaos(), *(worker(i) for i in range(clients)))
    errors = {}
    for fam in text_string_to_metric_families((await client.get("/metrics")).text):
        for s in fam.samples:
            if s.name == "clora_cache_errors_total":
                errors[s.labels["kind"]] = int(s.value)
    verdict = "PASS" if counts["failed"] == 0 else "FAIL"
    print(f"[3] {clients} clients x {duration:.0f} s, redis killed at 1/3 and back at 2/3: {counts['ok']} ok, "
          f"{counts['failed']} failed (target 0: {verdict}); hits {counts.get('hit', 0)}, "
          f"misses {counts.get('miss', 0)}; cache errors counted {errors}")
    for f in failures[:5]:
        print("    failure:", f)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-model", default=None, help="local HF model dir (default: the embedded SmolLM2)")
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--hits", type=int, default=300)
    ap.add_argument("--threads", type=int, default=None, help="CLORA_NUM_THREADS for the server")
    args = ap.parse_args()

    workdir = tempfile.mkdtemp(prefix="clora-bench-cache-")
    redis_port, port = free_port(), free_port()
    redis = [start_redis(redis_port, workdir)]
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    env = {**os.environ, "CLORA_REDIS_URL": redis_url, "CLORA_ADAPTERS_DIR": str(Path(workdir) / "adapters"),
           "CLORA_LOG_LEVEL": "warning"}
    if args.base_model:
        env["CLORA_BASE_MODEL"] = args.base_model
    if args.threads:
        env["CLORA_NUM_THREADS"] = str(args.threads)
    env.setdefault("CLORA_MODEL_CACHE_DIR", str(ROOT / ".model_cache"))
    server = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=ROOT, env=env)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120,
                                     limits=httpx.Limits(max_connections=args.clients + 4)) as client:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if (await client.get("/ready")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit("the server did not become ready")
                await asyncio.sleep(0.5)
            await hit_latency(client, args.hits)
            await miss_cost(redis_url, 2000)
            await outage_load(client, args.clients, args.duration, redis_port, workdir, redis)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        kill(redis[0])
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
