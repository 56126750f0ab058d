"""End-to-end routing accuracy (issue 4): per-task LoRAs served behind the router vs the oracle adapter.

1. Train one LoRA per task on raw prompts (``clora train --method per-task --prompt-style raw``: ``{input}\\nAnswer:``,
   no instruction or options, so the task is not given away by the text), or reuse a finished run dir.
2. Start a real server (empty adapter store, ``CLORA_ROUTER=<kind>``, response cache off so every request really
   generates) and register each task's adapter over HTTP: multipart zip + examples = the first --router-examples
   raw train inputs of the task (what bench/router.py trains its routers on; the rare input over the store's
   per-example limit is cut to it). Wait until the router has refit.
3. Send every test prompt of the run's ``predictions.jsonl`` (exactly the trainer's prompts; its max_new_tokens,
   temperature 0) twice, --concurrency at a time: ``model: "<task>"`` (oracle) and ``model: "auto"`` (router);
   exact match after continual.evaluate's cut + continual.metrics' normalisation.
4. Print per task: oracle acc, auto acc, auto/oracle, routing acc (``route.adapter`` == task); overall, the target
   (auto >= 0.98x oracle), and a sanity line: the HTTP oracle agrees with the trainer's offline predictions.

    python bench/router_e2e.py --data ../shared/data/cl_benchmark --out /tmp/router_e2e/run \\
        --max-train 200 --max-test 100 --lr 2e-3

A re-run with the same --out (or --adapters-from DIR) skips training. Results: ``<out>/router_e2e.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import json
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters_store.validate import MAX_EXAMPLE_CHARS  # noqa: E402
from bench.router import STANDARD, read_inputs  # noqa: E402
from continual.evaluate import cut  # noqa: E402
from continual.metrics import exact_match  # noqa: E402
from tests.server_proc import ServerProcess  # noqa: E402

TOKEN = "bench-router-e2e-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TARGET = 0.98


# ---- 1. adapters ------------------------------------------------------------------------------------------
def _finished(run_dir: Path, tasks: list[str]) -> dict[str, Any] | None:
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    return m if m.get("completed_tasks") == len(m["tasks"]) and m["tasks"] == tasks else None


def train(args: argparse.Namespace, tasks: list[str]) -> tuple[Path, float]:
    """The run dir holding the per-task adapters, and the seconds spent training here (0 when reused)."""
    if args.adapters_from is not None:
        if _finished(args.adapters_from, tasks) is None:
            raise SystemExit(f"{args.adapters_from} holds no finished per-task run over {tasks}")
        return args.adapters_from, 0.0
    if _finished(args.out, tasks) is not None:
        print(f"reusing the finished run in {args.out}", flush=True)
        return args.out, 0.0
    cmd = [sys.executable, "-m", "server.cli", "train", "--data", str(args.data), "--tasks", ",".join(tasks),
           "--method", "per-task", "--prompt-style", "raw", "--max-train", str(args.max_train),
           "--max-test", str(args.max_test), "--lr", str(args.lr), "--batch-size", str(args.batch_size),
           "--epochs", str(args.epochs), "--rank", str(args.rank), "--eval-batch-size", str(args.eval_batch_size),
           "--max-input-chars", str(args.max_input_chars), "--num-threads", str(args.train_threads),
           "--out", str(args.out), "--no-progress"]
    print("training:", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return args.out, time.perf_counter() - t0


def adapter_dirs(metrics: dict[str, Any]) -> dict[str, Path]:
    """task -> exported PEFT dir (per-task exports are named ``<name>-<task>``)."""
    cfg = metrics["config"]
    if cfg.get("method") != "per-task" or cfg.get("prompt_style", "instruction") != "raw":
        raise SystemExit(f"need a per-task run with --prompt-style raw, got method={cfg.get('method')} "
                         f"prompt_style={cfg.get('prompt_style', 'instruction')}")
    return {t: Path(metrics["adapters"][f"{cfg['name']}-{t}"]) for t in metrics["tasks"]}


# ---- 2. server ----------------------------------------------------------------------------------------------
def zip_dir(path: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted(path.iterdir()):
            z.write(p, p.name)
    return buf.getvalue()


def register(url: str, task: str, path: Path, examples: list[str]) -> None:
    jsonl = "".join(json.dumps({"prompt": e}) + "\n" for e in examples).encode()
    r = httpx.post(url + "/admin/adapters", headers=AUTH, timeout=120, data={"name": task},
                   files={"file": (f"{task}.zip", zip_dir(path), "application/zip"),
                          "examples": (f"{task}.jsonl", jsonl, "application/jsonl")})
    if r.status_code != 201:
        raise SystemExit(f"registering {task} failed: HTTP {r.status_code} {r.text[:500]}")


def complete(client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    r = client.post(url + "/v1/completions", timeout=600,
                    json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    r.raise_for_status()
    return r.json()


def wait_for_router(url: str, probes: dict[str, list[str]], timeout: float) -> float:
    """Poll ``model: auto`` until some probe of every task routes to that task (the refit runs in the background;
    a router fit before the last registration cannot name the last task). Returns the seconds waited."""
    t0 = time.perf_counter()
    pending = set(probes)
    with httpx.Client() as client:
        while pending:
            for task in sorted(pending):
                for text in probes[task]:
                    route = complete(client, url, "auto", text, 1)["route"]
                    if route["adapter"] == task and route["method"] not in ("fallback", "hint"):
                        pending.discard(task)
                        break
            if pending and time.perf_counter() - t0 > timeout:
                raise SystemExit(f"router never routed to {sorted(pending)} within {timeout:.0f} s")
            if pending:
                time.sleep(0.5)
    return time.perf_counter() - t0


# ---- 3. requests --------------------------------------------------------------------------------------------
def run_all(url: str, models: list[str], prompts: list[str], max_tokens: int,
            concurrency: int) -> tuple[list[dict[str, Any]], float]:
    """One completion per (model, prompt) pair, ``concurrency`` in flight; responses in order, and wall seconds."""
    t0 = time.perf_counter()
    with httpx.Client(limits=httpx.Limits(max_connections=concurrency)) as client, \
            cf.ThreadPoolExecutor(concurrency) as ex:
        out = list(ex.map(lambda mp: complete(client, url, mp[0], mp[1], max_tokens), zip(models, prompts)))
    return out, time.perf_counter() - t0


def text_of(resp: dict[str, Any]) -> str:
    return cut(resp["choices"][0]["text"])


# ---- 4. report ----------------------------------------------------------------------------------------------
def summarise(records: list[dict[str, Any]], tasks: list[str]) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    for name in tasks + ["overall"]:
        rs = [r for r in records if name == "overall" or r["task"] == name]
        n = max(len(rs), 1)
        oracle = sum(r["oracle_ok"] for r in rs) / n
        auto = sum(r["auto_ok"] for r in rs) / n
        rows[name] = {"n": len(rs), "oracle": oracle, "auto": auto, "ratio": auto / oracle if oracle else float("nan"),
                      "routing": sum(r["routed_to"] == r["task"] for r in rs) / n,
                      "fallback": sum(r["route_method"] == "fallback" for r in rs) / n,
                      "offline": sum(r["offline_ok"] for r in rs) / n,
                      "same_pred": sum(r["oracle_pred"] == r["offline_pred"] for r in rs) / n}
    return rows


def print_table(rows: dict[str, dict[str, float]]) -> None:
    print(f"\n{'task':<10} {'n':>5} {'oracle acc':>11} {'auto acc':>9} {'auto/oracle':>12} {'routing acc':>12} "
          f"{'fallback':>9}")
    for name, r in rows.items():
        if name == "overall":
            print("-" * 74)
        print(f"{name:<10} {r['n']:>5} {r['oracle']:>11.4f} {r['auto']:>9.4f} {r['ratio']:>12.4f} "
              f"{r['routing']:>12.4f} {r['fallback']:>9.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cl_benchmark")
    ap.add_argument("--tasks", default=",".join(STANDARD))
    ap.add_argument("--out", type=Path, default=Path("/tmp/router_e2e/run"), help="training run dir (reused)")
    ap.add_argument("--adapters-from", type=Path, default=None, help="a finished per-task raw run to serve")
    ap.add_argument("--max-train", type=int, default=200)
    ap.add_argument("--max-test", type=int, default=100)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--eval-batch-size", type=int, default=8)
    ap.add_argument("--max-input-chars", type=int, default=1000)
    ap.add_argument("--train-threads", type=int, default=1)
    ap.add_argument("--server-threads", type=int, default=2)
    ap.add_argument("--router", default="tfidf", help="CLORA_ROUTER kind")
    ap.add_argument("--router-examples", type=int, default=200, help="train inputs per task sent as examples")
    ap.add_argument("--min-confidence", type=float, default=None, help="CLORA_ROUTER_MIN_CONFIDENCE (default: "
                    "the server's)")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    ap.add_argument("--max-batch-size", type=int, default=None, help="CLORA_MAX_BATCH_SIZE (default: --concurrency)")
    ap.add_argument("--router-timeout", type=float, default=300.0)
    args = ap.parse_args()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]

    run_dir, train_s = train(args, tasks)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    adapters = adapter_dirs(metrics)
    max_tokens = int(metrics["config"]["max_new_tokens"])
    preds = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines() if line.strip()]
    full = {t: read_inputs(args.data / t / "train.jsonl", args.router_examples) for t in tasks}
    examples = {t: [x[:MAX_EXAMPLE_CHARS] for x in xs] for t, xs in full.items()}
    n_cut = sum(len(x) > MAX_EXAMPLE_CHARS for xs in full.values() for x in xs)
    if n_cut:
        print(f"{n_cut} router example(s) cut to the store's {MAX_EXAMPLE_CHARS} characters", flush=True)

    serve_dir = run_dir / "serve"
    shutil.rmtree(serve_dir, ignore_errors=True)
    (serve_dir / "store").mkdir(parents=True)
    env = {"CLORA_ADAPTERS_DIR": str(serve_dir / "store"), "CLORA_ADMIN_TOKEN": TOKEN, "CLORA_ROUTER": args.router,
           "CLORA_NUM_THREADS": str(args.server_threads), "CLORA_CACHE_ENABLED": "false",
           "CLORA_MAX_BATCH_SIZE": str(args.max_batch_size or args.concurrency)}
    if args.min_confidence is not None:
        env["CLORA_ROUTER_MIN_CONFIDENCE"] = str(args.min_confidence)
    prompts = [p["prompt"] for p in preds]
    with ServerProcess(env, serve_dir / "server.log", ready_timeout=600) as srv:
        t0 = time.perf_counter()
        for t in tasks:
            register(srv.url, t, adapters[t], examples[t])
        reg_s = time.perf_counter() - t0
        wait_s = wait_for_router(srv.url, {t: examples[t][:8] for t in tasks}, args.router_timeout)
        print(f"registered {len(tasks)} adapters in {reg_s:.1f} s; router ready after {wait_s:.1f} s more", flush=True)
        oracle, oracle_s = run_all(srv.url, [p["task"] for p in preds], prompts, max_tokens, args.concurrency)
        print(f"oracle pass: {len(prompts)} requests in {oracle_s:.0f} s", flush=True)
        auto, auto_s = run_all(srv.url, ["auto"] * len(prompts), prompts, max_tokens, args.concurrency)
        print(f"auto pass:   {len(prompts)} requests in {auto_s:.0f} s", flush=True)

    records = []
    for p, o, a in zip(preds, oracle, auto):
        assert o["route"]["adapter"] == p["task"], o["route"]  # the hint is obeyed
        records.append({
            "task": p["task"], "gold": p["gold"], "offline_pred": p["prediction"], "oracle_pred": text_of(o),
            "auto_pred": text_of(a), "routed_to": a["route"]["adapter"], "route_method": a["route"]["method"],
            "route_confidence": a["route"]["confidence"], "offline_ok": exact_match(p["prediction"], p["gold"]),
            "oracle_ok": exact_match(text_of(o), p["gold"]), "auto_ok": exact_match(text_of(a), p["gold"]),
        })
    rows = summarise(records, tasks)
    cfg = metrics["config"]
    print(f"\nrouter={args.router} ({args.router_examples} train inputs/task as examples), raw prompts; adapters: "
          f"per-task LoRA r={cfg['rank']}, {cfg['max_train']} train/task, lr {cfg['lr']}, bs {cfg['batch_size']}, "
          f"{cfg['epochs']} epoch(s); {cfg['max_test']} test/task, max_tokens {max_tokens}, temperature 0")
    print_table(rows)
    ov = rows["overall"]
    verdict = "PASS" if ov["ratio"] >= TARGET else "FAIL"
    print(f"\nauto/oracle = {ov['ratio']:.4f}   (target >= {TARGET}x: {verdict})")
    print(f"sanity: oracle over HTTP {ov['oracle']:.4f} vs trainer offline {ov['offline']:.4f}; identical prediction "
          f"on {ov['same_pred'] * ov['n']:.0f}/{ov['n']:.0f} prompts")
    wrong = [r for r in records if r["routed_to"] != r["task"]]
    if wrong:
        hurt = sum(r["oracle_ok"] and not r["auto_ok"] for r in wrong)
        print(f"misrouted: {len(wrong)} requests; of those, {hurt} were right with the oracle and wrong with auto, "
              f"{sum(r['auto_ok'] and not r['oracle_ok'] for r in wrong)} the other way round")
    print(f"times: training {train_s:.0f} s (0 = reused), oracle pass {oracle_s:.0f} s, auto pass {auto_s:.0f} s "
          f"(concurrency {args.concurrency}, server batch {env['CLORA_MAX_BATCH_SIZE']}, "
          f"{args.server_threads} threads)")
    (run_dir / "router_e2e.json").write_text(json.dumps(
        {"router": args.router, "rows": rows, "train_s": train_s, "oracle_s": oracle_s, "auto_s": auto_s,
         "records": records}, indent=1))


if __name__ == "__main__":
    main()
