"""A continual run's final adapter, served: does the server reproduce the trainer's predictions? (issue 5)

    python bench/served_continual.py --run runs/bench/gainlora
    clora evaluate --run runs/bench/gainlora --data ../shared/data/cl_benchmark      # float32 predictions
    python bench/served_continual.py --run runs/bench/gainlora --dtype float32 \
        --predictions runs/bench/gainlora/evaluations/float32/predictions.jsonl

Starts a server on the embedded SmolLM2 (gates router), registers ``<run>/adapters/<name>`` over the admin API and
sends every prompt of ``<run>/predictions.jsonl`` (the trainer's final evaluation, prompts exactly as fed to the
model) concurrently, greedy, ``max_tokens`` = the run's ``max_new_tokens``, stop at a newline. A ``gainlora``
adapter is asked with ``model: "auto"`` (no task hint: the gates route and mix); other kinds by name.
Prints the agreement with the trainer's predictions and the served accuracy per task against the offline one
(both computed from the predictions file). A bfloat16 run's own predictions carry its batch's rounding; compare a
float32 server with the run's float32 re-evaluation (``clora evaluate``) for the exact path.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import shutil
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from continual.metrics import exact_match  # noqa: E402
from tests.server_proc import ServerProcess  # noqa: E402

TOKEN = "bench-admin-token"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a `clora train` output dir")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--dtype", default="auto", help="the server's CLORA_DTYPE")
    ap.add_argument("--predictions", type=Path, default=None,
                    help="predictions to reproduce (default: <run>/predictions.jsonl)")
    args = ap.parse_args()
    metrics = json.loads((args.run / "metrics.json").read_text())
    cfg = metrics["config"]
    name = cfg["name"]
    pred_file = args.predictions or args.run / "predictions.jsonl"
    records = [json.loads(line) for line in pred_file.read_text().splitlines()]
    work = Path(tempfile.mkdtemp(prefix="clora-bench-served-"))
    env = {"CLORA_ADAPTERS_DIR": str(work / "store"), "CLORA_ROUTER": "gates", "CLORA_ADMIN_TOKEN": TOKEN,
           "CLORA_ROUTER_MIN_CONFIDENCE": "0.0", "CLORA_DTYPE": args.dtype, "CLORA_CACHE_ENABLED": "false",
           "CLORA_MAX_BATCH_SIZE": str(args.concurrency)}
    try:
        with ServerProcess(env, work / "server.log", ready_timeout=600) as srv:
            r = httpx.post(srv.url + "/admin/adapters", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120,
                           json={"name": name, "path": str((args.run / "adapters" / name).resolve())})
            r.raise_for_status()
            kind = r.json()["kind"]
            model = "auto" if kind == "gainlora" else name

            def serve(rec: dict) -> dict:
                resp = httpx.post(srv.url + "/v1/completions", timeout=300, json={
                    "model": model, "prompt": rec["prompt"], "max_tokens": cfg["max_new_tokens"],
                    "temperature": 0, "stop": ["\n"]})
                resp.raise_for_status()
                return resp.json()

            with cf.ThreadPoolExecutor(args.concurrency) as ex:
                served = list(ex.map(serve, records))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    texts = [s["choices"][0]["text"] for s in served]
    same = sum(t == rec["prediction"] for t, rec in zip(texts, records)) / len(records)
    same_norm = sum(exact_match(t, rec["prediction"]) for t, rec in zip(texts, records)) / len(records)
    methods = sorted({s["route"]["method"] for s in served})
    print(f"{name} ({kind}) served as model={model!r}, route methods {methods}, {len(records)} prompts")
    print(f"agreement with the trainer's predictions: {same:.4f} exact text, {same_norm:.4f} after normalisation "
          "(target >= 0.99)")
    tasks = list(dict.fromkeys(rec["task"] for rec in records))
    print(f"{'task':<10} {'offline':>8} {'served':>8}")
    offline_acc, served_acc = [], []
    for task in tasks:
        rows = [(t, rec) for t, rec in zip(texts, records) if rec["task"] == task]
        offline_acc.append(sum(exact_match(rec["prediction"], rec["gold"]) for _, rec in rows) / len(rows))
        served_acc.append(sum(exact_match(t, rec["gold"]) for t, rec in rows) / len(rows))
        print(f"{task:<10} {offline_acc[-1]:>8.3f} {served_acc[-1]:>8.3f}")
    ap_offline, ap_served = sum(offline_acc) / len(tasks), sum(served_acc) / len(tasks)
    print(f"AP offline {ap_offline:.4f}  served {ap_served:.4f}  difference "
          f"{100 * (ap_served - ap_offline):+.2f} points (target within 1)")


if __name__ == "__main__":
    main()
