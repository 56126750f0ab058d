"""Decode-step benchmark: what a mixed batch's LoRA term costs the engine, without HTTP or scheduling.

Builds the engine's model as the server does (wrapped layers, packed on CPU in bf16), puts 8 PEFT adapters
(r 8 and 16, q/k/v/o, as in bench/throughput.py) into its slots, prefills --rows prompts of 64 tokens and times
decode steps, alternating base-only and mixed batches (row i on adapter i mod 8) for --repeats rounds. Over HTTP
one path's tok/s moves by 10-30% within minutes on this shared VM; steps timed a few milliseconds apart, in
alternation, see the same machine. A third path runs the mixed batch with every LoRA term on oneDNN's packed calls
(no compiled kernel, ``SMALL_TERM = 0``): what the kernel (server/engine/lora_kernel.py) saves.

    python bench/decode_step.py [--rows 16] [--steps 24] [--repeats 6] [--threads 2] [--dtype auto]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters_store.kinds import load_adapter_dir  # noqa: E402
from bench.throughput import ratio_of_medians  # noqa: E402
from base_model.loader import DEFAULT_CACHE_DIR, embedded_model_dir, load_base_model, pick_device, pick_dtype  # noqa: E402
from server.engine import packed_lora  # noqa: E402
from server.engine.build import build_engine  # noqa: E402
from server.engine.lora_layers import build_lora_batch  # noqa: E402
from server.settings import Settings  # noqa: E402
from tests.engine.peft_helpers import make_peft_adapter  # noqa: E402

PROMPT_TOKENS = 64


def step_ms(engine, slots: list[int], prompts: list[list[int]], steps: int) -> float:  # type: ignore[no-untyped-def]
    """Median milliseconds of one decode step for rows on ``slots`` (-1: base model), after a prefill; the first
    quarter of the steps is left out (warm-up)."""
    runner = engine.runner
    build_lora_batch(engine.lora_batch, slots, [None] * len(slots), engine.slots.rows(), runner.device,
                     engine.lora_dtype)
    runner.prefill(list(range(len(slots))), prompts)
    lens, tokens, times = [PROMPT_TOKENS] * len(slots), [5] * len(slots), []
    for _ in range(steps):
        t0 = time.perf_counter()
        runner.decode(tokens, lens)
        times.append(time.perf_counter() - t0)
        lens = [n + 1 for n in lens]
    return statistics.median(times[steps // 4:]) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    cache = Path(DEFAULT_CACHE_DIR)
    model_dir = embedded_model_dir(cache)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    loaded = load_base_model(str(model_dir), cache, str(device), str(dtype).replace("torch.", ""), args.threads)
    engine = build_engine(loaded, Settings(max_loras=8, max_batch_size=args.rows).engine,
                          weights_for=lambda key: None, max_model_len=PROMPT_TOKENS + args.steps + 8)  # type: ignore[arg-type,return-value]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 20000, (PROMPT_TOKENS,), generator=g).tolist() for _ in range(args.rows)]
    with tempfile.TemporaryDirectory() as work, torch.inference_mode():
        slots = []
        for i in range(8):
            path = make_peft_adapter(model_dir, Path(work) / f"ad{i}", r=8 if i % 2 else 16, seed=100 + i, std=0.01)
            slots.append(engine.adapters.write((f"ad{i}", 1), load_adapter_dir(path)))
        mix = [slots[i % 8] for i in range(args.rows)]
        base, mixed, onednn = [], [], []
        small = packed_lora.SMALL_TERM
        terms = [t for m in engine.runner.model.modules()
                 for t in (getattr(m, "term", None), getattr(m, "packed_term", None))
                 if isinstance(t, packed_lora.PackedLoraTerm)]
        kernels = [t.kernel for t in terms]
        print(f"{sum(k is not None for k in kernels)} of {len(terms)} LoRA terms on the compiled kernel")
        for r in range(args.repeats):
            base.append(step_ms(engine, [-1] * args.rows, prompts, args.steps))
            mixed.append(step_ms(engine, mix, prompts, args.steps))
            packed_lora.SMALL_TERM = 0
            for t in terms:
                t.kernel = None
            onednn.append(step_ms(engine, mix, prompts, args.steps))
            packed_lora.SMALL_TERM = small
            for t, k in zip(terms, kernels):
                t.kernel = k
            print(f"round {r + 1}: base {base[-1]:.1f} ms, mixed {mixed[-1]:.1f} ms, mixed on oneDNN only "
                  f"{onednn[-1]:.1f} ms", flush=True)
    print(f"\ndevice={device} dtype={dtype} threads={torch.get_num_threads()} rows={args.rows} "
          f"(mixed: 8 adapters, r 8 and 16, q/k/v/o)")
    print(f"decode step, median of {args.repeats} rounds: base {statistics.median(base):.1f} ms, "
          f"mixed {statistics.median(mixed):.1f} ms, mixed on oneDNN only {statistics.median(onednn):.1f} ms")
    print(f"LoRA cost over base: {statistics.median(m - b for m, b in zip(mixed, base)):.1f} ms, on oneDNN only "
          f"{statistics.median(o - b for o, b in zip(onednn, base)):.1f} ms (medians of per-round differences)")
    print(f"base/mixed step time = {ratio_of_medians(base, mixed)}: the decode share of (b)/(a) in "
          "bench/throughput.py")


if __name__ == "__main__":
    main()
