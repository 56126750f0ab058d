"""The engine loop: continuous (iteration-level) batching of many adapters over one resident model.

One thread owns the model, the KV cache and the adapter slots; nothing else touches them. Each iteration:

1. take new requests from the inbox; drop cancelled rows;
2. admit waiting requests (FIFO, per adapter) while rows and compute slots allow, loading adapters into
   slots first (load and validate first, evict second) and prefill them together;
3. decode one token for every live row in one forward pass, each row on its own adapter slot;
4. emit text deltas, retire finished rows at once (their cache rows are compacted away).

Which adapter version sits in which slot, and the slot writes: adapter_slots.py. A row's state, token by token:
rows.py. The forward passes: model_runner.py.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable, Protocol, TypeVar

import torch

from adapters_store.weights import AdapterWeights

from .adapter_slots import AdapterSlots, AdapterUnavailable
from .lora_layers import LoraBatch, SlotLoRALinear, build_lora_batch
from .model_runner import ModelRunner
from .requests import Done, Failed, GenerationRequest, Overloaded
from .rows import Row
from .sampling import first_argmax
from .slots import AdapterKey

log = logging.getLogger(__name__)
T = TypeVar("T")
_DROPPED = -2  # the request failed while its adapter was loaded; it has been answered


class EngineHooks(Protocol):
    """Metric hook points (see server/metrics.py); implementations must not raise."""

    def engine_state(self, running: int, waiting: int, batch_size: int) -> None: ...
    def decode_step(self, rows: int) -> None: ...
    def queue_wait(self, seconds: float) -> None: ...
    def ttft(self, adapter: str, seconds: float) -> None: ...
    def inter_token(self, adapter: str, seconds: float) -> None: ...
    def adapter_loaded(self, adapter: str, tier: str, seconds: float) -> None: ...
    def adapter_evicted(self, tier: str) -> None: ...
    def adapters_resident(self, tier: str, n: int) -> None: ...
    def slot_rows(self, used: int, free: int) -> None: ...


class Engine:
    """Owns the model loop. ``submit`` is thread-safe; everything else runs on the engine thread."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: object,
        lora_batch: LoraBatch,
        lora_layers: dict[str, SlotLoRALinear],
        weights_for: Callable[[AdapterKey], AdapterWeights],
        *,
        max_batch_size: int,
        pool_rows: int,
        max_queue: int,
        max_model_len: int,
        prefill_chunk: int = 4,
        hooks: EngineHooks | None = None,
    ) -> None:
        self.runner = ModelRunner(model, max_batch_size, max_model_len)
        self.tokenizer = tokenizer
        self.lora_batch, self.lora_layers = lora_batch, lora_layers
        first = next(iter(lora_layers.values()), None)  # slots store the model's dtype; the term runs in this one
        self.lora_dtype = first.compute_dtype if first is not None else self.runner.dtype
        self.max_batch_size, self.max_queue, self.prefill_chunk = max_batch_size, max_queue, prefill_chunk
        self.hooks = hooks
        self.adapters = AdapterSlots(lora_layers, weights_for, pool_rows, self.runner.dtype, self._hook)
        self.slots = self.adapters.table  # which version sits where; rows pin the slots they use
        self.eos_ids = self._eos_ids(model, tokenizer)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._control: queue.SimpleQueue = queue.SimpleQueue()  # callables run between steps
        self._waiting: deque[GenerationRequest] = deque()
        self._rows: list[Row] = []
        self._pending = 0  # submitted, not yet admitted (approximate across threads)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0

    @staticmethod
    def _eos_ids(model: torch.nn.Module, tokenizer: object) -> set[int]:
        ids = model.generation_config.eos_token_id if model.generation_config else None
        ids = ids if isinstance(ids, list) else [ids]
        out = {i for i in ids if i is not None}
        if getattr(tokenizer, "eos_token_id", None) is not None:
            out.add(tokenizer.eos_token_id)
        return out

    # ---- public, thread-safe ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="clora-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread:
            self._thread.join(timeout=30)

    @property
    def waiting(self) -> int:
        return self._pending

    @property
    def running(self) -> int:
        return len(self._rows)

    def submit(self, req: GenerationRequest) -> None:
        with self._lock:
            if self._pending >= self.max_queue:
                raise Overloaded(self._pending)
            self._pending += 1
        self._inbox.put(req)

    def call_soon(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` on the engine thread between two steps; the future holds its result or its error (which
        fails nothing else: running rows go on)."""
        fut: Future[T] = Future()

        def wrapped() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # handed to whoever waits on the future
                    fut.set_exception(e)

        self._control.put(wrapped)
        self._inbox.put(None)  # wake the loop
        return fut

    def drop_adapter(self, name: str) -> Future[None]:
        """Free the slots of every version of ``name`` that no running row uses (others free as rows end)."""
        return self.call_soon(lambda: self.adapters.drop(name))

    def hold_adapter(self, key: AdapterKey, held: bool) -> Future[None]:
        """Operator pin: load ``key`` into a slot now and keep it there (``held=False`` releases it); the future
        fails with ``NoSlotFree`` when the slots' rows are all in use or pinned."""
        return self.call_soon(lambda: self.adapters.hold(key, held))

    def stage_adapter(self, key: AdapterKey) -> Future[None]:
        """Put a version just registered into a compute slot before its first request, when that takes nothing from
        anyone: no request is waiting, and a slot is free or idle (no rows, no operator pin; the least recently
        used goes). Its first request then finds it in place: the slot write (6-17 ms on SmolLM2, r 16 on
        q/k/v/o) runs while the register call's answer travels and that request comes in."""
        return self.call_soon(lambda: None if self._waiting else self.adapters.stage(key))

    def run_on_engine(self, fn: Callable[[], T], timeout: float = 120.0) -> T:
        """Run ``fn`` with the bare base model (no adapter applied) on the engine thread, between two steps, and
        return its result (or raise its error). Blocks the caller; never call it from the event loop.

        All model work happens on this one thread: torch keeps an OpenMP team alive for every thread that ran
        parallel work, and a second live team slows the engine's steps (about 1.4x per matmul on 2 cores).
        Before the loop starts (start-up), ``fn`` runs on the caller's thread."""
        if self._thread is None or threading.current_thread() is self._thread:
            self.lora_batch.clear()
            return fn()

        def job() -> T:
            self.lora_batch.clear()
            return fn()

        try:
            return self.call_soon(job).result(timeout)
        except FutureTimeout:
            raise TimeoutError(f"the engine did not run the job within {timeout:.0f} s") from None

    def resident(self) -> list[AdapterKey]:
        return self.slots.keys()

    # ---- engine thread --------------------------------------------------------------------------------
    def _loop(self) -> None:
        # Inference mode for the whole loop: tensors made in a step (a grown KV cache) are inference tensors,
        # and the in-place updates between steps (compacting rows, writing slots) must be allowed on them.
        with torch.inference_mode():
            while not self._stop.is_set():
                try:
                    self._step()
                except Exception as e:  # never let one bad step kill the server
                    log.exception("engine step failed")
                    self._fail_running(e)

    def _step(self) -> None:
        idle = not self._rows and not self._waiting
        self._drain_inbox(block=idle)
        self._run_control()
        self._drop_cancelled()
        self._admit()
        if self._rows:
            self._decode()
        self._report()

    def _fail_running(self, e: Exception) -> None:
        """Answer every running row with the error and free its slot pin (once: a row may have been retired
        before the step failed)."""
        for row in self._rows:
            try:
                row.req.emit(Failed(f"engine error: {e}"))
            except Exception:
                log.exception("could not report the engine error to request %s", row.req.id)
            self._unpin(row)
        self._rows.clear()

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return

    def _run_control(self) -> None:
        while True:
            try:
                self._control.get_nowait()()
            except queue.Empty:
                return

    def _drop_cancelled(self) -> None:
        for req in [r for r in self._waiting if r.cancelled.is_set()]:
            self._waiting.remove(req)
            self._dequeued()
            req.emit(Done("cancelled", len(req.prompt_ids), 0, {}))
        for row in self._rows:
            if row.req.cancelled.is_set():
                row.finish = "cancelled"
        self._retire()

    def _dequeued(self) -> None:
        with self._lock:
            self._pending -= 1

    # ---- admission ------------------------------------------------------------------------------------
    def _admit(self) -> None:
        admitted: list[Row] = []
        blocked_head = False
        for req in list(self._waiting):
            if len(self._rows) + len(admitted) >= self.max_batch_size or len(admitted) >= self.prefill_chunk:
                break
            slot = self._slot_for(req, allow_load=not blocked_head)
            if slot == _DROPPED:
                continue
            if slot is None:
                if not blocked_head:
                    blocked_head = True
                    self.slots.drain_one(exclude={r.slot for r in admitted})
                continue
            self._waiting.remove(req)
            self._dequeued()
            admitted.append(self._make_row(req, slot))
        if admitted:
            self._prefill(admitted)

    def _slot_for(self, req: GenerationRequest, allow_load: bool) -> int | None:
        if req.adapter is None:
            return -1
        slot = self.slots.lookup(req.adapter)
        if slot is not None or not allow_load:
            return slot
        try:
            return self.adapters.acquire(req.adapter)
        except AdapterUnavailable as e:
            self._waiting.remove(req)
            self._dequeued()
            req.emit(Failed(f"adapter {req.adapter[0]} v{req.adapter[1]} could not be loaded: {e}"))
            return _DROPPED

    def _make_row(self, req: GenerationRequest, slot: int) -> Row:
        row = Row.admit(req, slot, self.tokenizer, self.eos_ids)
        self._hook("queue_wait", row.timings["queue_s"])
        if slot >= 0:
            self.slots.pin(slot)
            req.rank_weights = self.adapters.rank_weights(slot, lambda: self.runner.pooled_embedding(req.prompt_ids))
        return row

    def _set_lora_batch(self, rows: list[Row], per_row: bool = False) -> None:
        build_lora_batch(self.lora_batch, [r.slot for r in rows], [r.req.rank_weights for r in rows],
                         self.slots.rows(), self.runner.device, self.lora_dtype, per_row)

    def _prefill(self, new: list[Row]) -> None:
        base = len(self._rows)
        # Several adapters: row by row (no row pays for the others' ranks; see packed_lora.py). A decode step
        # keeps the mask: one token per row, and its copies of the slots stay put while per-row ones would not.
        # Per-row copies hold U x the largest rank rows: past the pool's size (one large rank among many small
        # ones), the mask's, which hold the sum of the ranks, keep the memory within what the slots take.
        used = {r.slot for r in new if r.slot >= 0}
        per_row = len(used) > 1 and len(used) * max(len(self.slots.rows_of(s)) for s in used) <= self.slots.capacity
        self._set_lora_batch(new, per_row=per_row)
        logits, scored = self.runner.prefill_scored(list(range(base, base + len(new))),
                                                    [r.req.prompt_ids for r in new],
                                                    [r.req.params.prompt_logprobs for r in new])
        self._rows.extend(new)
        for row, prompt_lps in zip(new, scored):
            row.prompt_logprobs = tuple(prompt_lps or ())
        self._take(new, logits)

    # ---- decoding ------------------------------------------------------------------------------------
    def _decode(self) -> None:
        rows = self._rows
        self._set_lora_batch(rows)
        logits = self.runner.decode([r.next_token for r in rows], [r.length for r in rows])
        self.steps += 1
        self._hook("decode_step", len(rows))
        for row in rows:
            row.length += 1
        self._take(rows, logits)

    def _take(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Each row's next token from its logits (the greedy rows' argmaxes in one pass over the batch), then
        retire the rows that ended."""
        picks = first_argmax(logits) if any(r.sampler.params.greedy for r in rows) else [None] * len(rows)
        for row, lg, pick in zip(rows, logits, picks):
            self._accept(row, row.sampler(lg, pick), lg)
        self._retire()

    def _accept(self, row: Row, token: int, logits: torch.Tensor) -> None:
        now = time.perf_counter()
        if row.generated == 0:
            row.first_token_at = now
            self._hook("ttft", row.label, now - row.req.arrived)
        else:
            self._hook("inter_token", row.label, now - row.last_token_at)
        row.last_token_at = now
        row.accept(token, logits, self.runner.max_len)

    def _retire(self) -> None:
        if not any(r.finish for r in self._rows):
            return
        keep: list[Row] = []
        for i, row in enumerate(self._rows):
            if row.finish is None:
                if len(keep) != i:
                    self.runner.move_row(i, len(keep))  # keep live rows contiguous in the cache
                keep.append(row)
                continue
            self._unpin(row)
            row.close()
        self._rows = keep
        if not keep:
            self.runner.shrink()

    def _unpin(self, row: Row) -> None:
        if row.pinned:
            row.pinned = False
            self.slots.unpin(row.slot)

    def _report(self) -> None:
        self._hook("engine_state", len(self._rows), self._pending, len(self._rows))
        self._hook("adapters_resident", "slot", len(self.slots))
        self._hook("slot_rows", self.slots.capacity - self.slots.free_rows, self.slots.free_rows)

    def _hook(self, name: str, *args: object) -> None:
        if self.hooks is None:
            return
        try:
            getattr(self.hooks, name)(*args)
        except Exception:  # metrics never break serving
            log.debug("metrics hook %s failed", name, exc_info=True)
