"""Throughput benchmark (issue 2): clora-serve over HTTP vs PEFT's paths (and vLLM when its URL is given).

64 requests, prompts of about 64 tokens, 32 new tokens, greedy, concurrency 16:
  (a) clora base only          (b) clora mixed across 8 adapters (r 8 and 16, q/k/v/o)
  (c) naive PEFT: set_adapter + generate, one request at a time
  (d) PEFT mixed batch: generate(adapter_names=...) in batches of 16
  (e) vLLM (--vllm-url: a vLLM server on this machine; the bench loads the 8 adapters into it), base and mixed
Also: seconds from process start to /ready (model cache present) and resident memory at idle.

Every path runs --repeats rounds (default 3), interleaved within each round, each round on prompts of its own;
the table gives the median and range of each path and the ratios of the medians. On this shared 2-core VM one
path's tok/s moves by 10-15% from one run to the next, more than some of the margins the targets leave.

Usage: python bench/throughput.py [--requests 64] [--concurrency 16] [--naive-requests 16] [--repeats 3]
                                  [--vllm-url URL]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.engine.peft_helpers import make_peft_adapter  # noqa: E402
from base_model.loader import DEFAULT_CACHE_DIR  # noqa: E402
from tests.server_proc import ServerProcess  # noqa: E402

TOPICS = ["the history of the Roman empire", "how photosynthesis works", "the rules of chess",
          "a recipe for bread", "the life of honey bees", "how computers store numbers",
          "the water cycle", "the French revolution"]


def make_prompts(tok, n: int, target_tokens: int = 64) -> list[str]:
    out = []
    for i in range(n):
        text = f"Request {i}. Write a detailed, friendly explanation of {TOPICS[i % len(TOPICS)]}."
        while len(tok(text)["input_ids"]) < target_tokens:
            text += f" Please cover point {len(text) % 97} about {TOPICS[(i + len(text)) % len(TOPICS)]} too."
        ids = tok(text)["input_ids"][:target_tokens]
        out.append(tok.decode(ids))
    return out


def http_run(url: str, model_for, prompts: list[str], new_tokens: int, concurrency: int,
             extra: dict | None = None) -> tuple[float, int]:
    """Seconds and completion tokens for ``prompts`` sent ``concurrency`` at a time over one keep-alive client,
    as the ``openai`` client sends them. A new client per request costs ~24 ms of CPU here (its TLS context),
    which the load generator would take from the server it measures on this 2-core machine, at every wave."""
    def one(client: httpx.Client, i: int) -> int:
        body = {"model": model_for(i), "prompt": prompts[i], "max_tokens": new_tokens, "temperature": 0,
                "ignore_eos": True, **(extra or {})}
        r = client.post("/v1/completions", json=body)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(base_url=url, timeout=600, limits=limits) as client, cf.ThreadPoolExecutor(concurrency) as ex:
        t0 = time.perf_counter()
        toks = sum(ex.map(lambda i: one(client, i), range(len(prompts))))
        return time.perf_counter() - t0, toks


def peft_model(model_dir: Path, adapters: dict[str, Path], dtype: torch.dtype, device: str):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    names = list(adapters)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(adapters[n], adapter_name=n)
    return model.eval()


def peft_naive(model, tok, names, prompts, new_tokens, device) -> tuple[float, int]:
    t0, toks = time.perf_counter(), 0
    for i, p in enumerate(prompts):
        model.set_adapter(names[i % len(names)])
        ids = tok(p, return_tensors="pt").to(device)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
        toks += out.shape[1] - ids["input_ids"].shape[1]
    return time.perf_counter() - t0, toks


def peft_mixed(model, tok, names, prompts, new_tokens, batch, device) -> tuple[float, int]:
    tok.padding_side = "left"
    t0, toks = time.perf_counter(), 0
    for s in range(0, len(prompts), batch):
        chunk = prompts[s:s + batch]
        ids = tok(chunk, return_tensors="pt", padding=True).to(device)
        an = [names[(s + j) % len(names)] for j in range(len(chunk))]
        with torch.no_grad():
            out = model.generate(**ids, adapter_names=an, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=tok.eos_token_id)
        toks += (out.shape[1] - ids["input_ids"].shape[1]) * len(chunk)
    return time.perf_counter() - t0, toks


def load_into_vllm(url: str, adapters: dict[str, Path]) -> None:
    """Load each adapter into a vLLM server on this machine under its name (the server needs
    ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``); one it already holds under that name is replaced."""
    with httpx.Client(base_url=url, timeout=120) as c:
        for name, path in adapters.items():
            c.post("/v1/unload_lora_adapter", json={"lora_name": name})  # 4xx when it was not loaded: fine
            r = c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
            if r.status_code != 200:
                raise SystemExit(f"vLLM refused adapter {name}: {r.status_code} {r.text}")


Measured = tuple[str, Callable[[list[str], int], tuple[float, int]]]  # label, run(prompts, new tokens) -> (s, tokens)


def http_paths(url: str, base_id: str, names: list[str], concurrency: int, labels: tuple[str, str]) -> list[Measured]:
    """One server's two rows, measured alike for clora and vLLM: every prompt on the base model, and every
    prompt spread over ``names``."""
    return [(labels[0], lambda ps, new: http_run(url, lambda i: base_id, ps, new, concurrency)),
            (labels[1], lambda ps, new: http_run(url, lambda i: names[i % len(names)], ps, new, concurrency))]


def _busy_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU jiffies of the whole machine since boot, from /proc/stat (None where there is none)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def wait_until_quiet(busy_below: float = 0.1, window_s: float = 0.5, max_wait_s: float = 20.0) -> float:
    """Wait until the machine's CPUs are less than ``busy_below`` busy over ``window_s``; returns the seconds
    waited. A server keeps spinning after its last request (vLLM-CPU: about 1.1 s of CPU), and the path measured
    next would pay for it: on 2 cores, clora's base path ran at 203-218 tok/s right after a vLLM round against
    267-280 alone. Every path waits alike."""
    start = time.perf_counter()
    before = _busy_jiffies()
    while before is not None and time.perf_counter() - start < max_wait_s:
        time.sleep(window_s)
        after = _busy_jiffies()
        busy, total = after[0] - before[0], after[1] - before[1]
        if total and busy / total < busy_below:
            break
        before = after
    return time.perf_counter() - start


def measure(paths: list[Measured], warm: list[str], rounds: list[list[str]], new_tokens: int) -> dict[str, list[float]]:
    """tok/s of every path in every round, after a short warm-up of each: the paths interleaved within a round
    (so a slow phase of the machine falls on all of them), each round on prompts of its own (no cache or prefix
    reuse across rounds), each path once the machine is quiet (``wait_until_quiet``)."""
    for _, run in paths:
        run(warm, 4)
    out: dict[str, list[float]] = {label: [] for label, _ in paths}
    for r, prompts in enumerate(rounds):
        for label, run in paths:
            waited = wait_until_quiet()
            secs, toks = run(prompts, new_tokens)
            out[label].append(toks / secs)
            print(f"round {r + 1}: {label:58s} {toks / secs:9.1f} tok/s   (waited {waited:.1f} s for quiet)",
                  flush=True)
    return out


def ratio_of_medians(xs: list[float], ys: list[float]) -> str:
    """``median(xs) / median(ys)``, then the same ratio within each round (its two paths measured minutes apart
    at most) and the median of those, as printed by the benches: on this VM one slow phase can move one path of
    one round by 30%, and the two estimates disagree when it did."""
    per_round = [x / y for x, y in zip(xs, ys)]
    return (f"{statistics.median(xs) / statistics.median(ys):.2f} (per round {', '.join(f'{r:.2f}' for r in per_round)}"
            f"; their median {statistics.median(per_round):.2f})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--naive-requests", type=int, default=16, help="(c) is slow: time this many, report tok/s")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of every path; medians are reported")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--vllm-url", default=None)
    ap.add_argument("--vllm-model", default=None)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--base-model", default=None, help="HF model dir (default: the embedded SmolLM2)")
    args = ap.parse_args()

    from base_model.loader import embedded_model_dir, pick_device, pick_dtype
    from transformers import AutoTokenizer

    cache = Path(os.environ.get("CLORA_MODEL_CACHE_DIR", DEFAULT_CACHE_DIR))
    model_dir = Path(args.base_model) if args.base_model else embedded_model_dir(cache)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    n = args.requests
    prompts = make_prompts(tok, n * args.repeats + 16)
    warm, rounds = prompts[-16:], [prompts[r * n:(r + 1) * n] for r in range(args.repeats)]
    work = Path(tempfile.mkdtemp(prefix="clora-bench-"))
    adapters = {}
    for i in range(8):
        name = f"ad{i}"
        adapters[name] = make_peft_adapter(model_dir, work / "adapters" / name, r=8 if i % 2 else 16, seed=100 + i,
                                           std=0.01)
    names = list(adapters)
    env = {"CLORA_BASE_MODEL": str(model_dir) if args.base_model else "", "CLORA_ADAPTERS_DIR": str(work / "adapters"), "CLORA_MODEL_CACHE_DIR": str(cache),
           "CLORA_DTYPE": str(dtype).replace("torch.", ""), "CLORA_DEVICE": str(device), "CLORA_ROUTER": "hint",
           "CLORA_MAX_BATCH_SIZE": str(args.concurrency), "CLORA_MAX_LORAS": "8"}
    if args.threads:
        env["CLORA_NUM_THREADS"] = str(args.threads)
    wait_until_quiet()  # as every path does: a vLLM server started just before still spins
    t_start = time.perf_counter()
    with ServerProcess(env, work / "server.log") as srv:
        ready_s = time.perf_counter() - t_start
        time.sleep(1.0)
        rss_idle = srv.rss_bytes()
        base_id = httpx.get(srv.url + "/ready").json()["model"]
        paths = http_paths(srv.url, base_id, names, args.concurrency,
                           ("(a) clora base only", "(b) clora mixed 8 adapters"))
        model = None
        if not args.skip_peft:
            model = peft_model(model_dir, adapters, dtype, str(device))
            k = args.naive_requests
            paths += [(f"(c) PEFT set_adapter+generate, 1 at a time ({k} req)",
                       lambda ps, new: peft_naive(model, tok, names, ps[:k], new, device)),
                      ("(d) PEFT mixed batch adapter_names",
                       lambda ps, new: peft_mixed(model, tok, names, ps, new, args.concurrency, device))]
        if args.vllm_url:
            vm = args.vllm_model or httpx.get(args.vllm_url + "/v1/models").json()["data"][0]["id"]
            load_into_vllm(args.vllm_url, adapters)
            paths += http_paths(args.vllm_url, vm, names, args.concurrency,
                                ("(e) vLLM base only", "(e) vLLM mixed 8 adapters"))
        tps = measure(paths, warm, rounds, args.new_tokens)
        del model

    print(f"\ndevice={device} dtype={dtype} threads={torch.get_num_threads()} requests={n} "
          f"concurrency={args.concurrency} new_tokens={args.new_tokens} rounds={args.repeats} (paths interleaved in each)")
    print(f"{'path':58s} {'median tok/s':>12s} {'min':>7s} {'max':>7s}")
    for label, v in tps.items():
        print(f"{label:58s} {statistics.median(v):12.1f} {min(v):7.1f} {max(v):7.1f}")
    print("\nratios of the medians:")
    for name, x, y, target in (("(b)/(a) mixed vs base", "(b)", "(a)", ">= 0.85"),
                               ("(b)/(c) vs naive PEFT", "(b)", "(c)", ">= 10"),
                               ("(b)/(d) vs PEFT mixed batch", "(b)", "(d)", ">= 1.5"),
                               ("(a)/vLLM base", "(a)", "(e) vLLM base", ">= 1.0"),
                               ("(b)/vLLM mixed", "(b)", "(e) vLLM mixed", ">= 3")):
        xs = next((v for label, v in tps.items() if label.startswith(x)), None)
        ys = next((v for label, v in tps.items() if label.startswith(y)), None)
        if xs and ys:
            print(f"  {name:31s}= {ratio_of_medians(xs, ys)}   (target {target})")
    print(f"\nstart to /ready: {ready_s:.1f} s (goal <= 10 s)   idle RSS: {rss_idle / 2**30:.2f} GiB (goal <= 1.5)")


if __name__ == "__main__":
    main()
