"""The decoder forward pass with a per-row KV cache, for Llama-family models (llama, mistral, qwen2, qwen3).

It reuses the Hugging Face modules (embeddings, norms, rotary embedding, the q/k/v/o and MLP linears, which the
LoRA wrapper may have replaced) and owns only attention and the cache, so rows of different lengths can be
prefilled and decoded together and a row can join or leave between any two steps.

Cache layout, per layer: ``K, V (rows, n_kv, L_alloc, D)``. Live sequences occupy cache rows ``0..n-1``
contiguously (``compact`` moves the last row into a freed hole), so a decode step attends over the views
``K[:n, :, :L]`` without copying. ``L_alloc`` grows by doubling when a row needs more room.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .sampling import TokenLogprob, token_logprobs

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SCORE_CHUNK = 256  # prompt positions whose vocabulary logits are materialised at once when scoring a prompt
# On CPU, prompts up to this long attend with plain products; longer ones (and any on CUDA) with the fused kernel.
# SmolLM2, 16 prompts, per layer in bf16 on 2 cores: 64 tokens 1.0 ms against 2.4; 256 tokens 73 ms against 23.
MATH_ATTENTION_MAX_T = 128


class UnsupportedModel(RuntimeError):
    """The base model's architecture is not one this runner implements."""


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, HF's ``x·cos + rotate_half(x)·sin`` bit for bit: the half swap is a roll and its sign is
    folded into ``sin_signed`` once per forward, so 4 ops instead of 7. x (N, T, heads, D); cos/sin (N, T, 1, D)."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin_signed


def _fused_norm(module: nn.Module, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """HF's RMSNorm (normalise in float32, cast back, times the weight: eight ops) as one fused ``rms_norm`` and
    a product, when that gives the module's own values on a probe; any other norm stays the module itself.
    ``rms_norm`` of a bf16 input normalises in float32 itself where torch's kernel does; else it is cast first."""
    w, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or not isinstance(eps, float):
        return module
    shape = (w.shape[0],)

    def direct(x: torch.Tensor) -> torch.Tensor:
        return w * F.rms_norm(x, shape, eps=eps)

    def cast(x: torch.Tensor) -> torch.Tensor:
        return w * F.rms_norm(x.float(), shape, eps=eps).to(x.dtype)

    probe = torch.randn(64, shape[0], generator=torch.Generator().manual_seed(0)).to(w.device, dtype) * 3
    with torch.inference_mode():
        want = module(probe)
        return next((norm for norm in (direct, cast) if torch.equal(norm(probe), want)), module)


def _plus_module(mlp: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``residual + mlp(x)``: what a fused MLP (packed_mlp.PackedMLP) computes, for a module without one."""
    return lambda x, residual: residual + mlp(x)


class ModelRunner:
    """Runs prefill and decode steps of a causal LM over a slot-indexed KV cache."""

    def __init__(self, model: nn.Module, max_rows: int, max_len: int, initial_len: int = 64) -> None:
        cfg = model.config
        if cfg.model_type not in SUPPORTED_TYPES:
            raise UnsupportedModel(
                f"model_type {cfg.model_type!r} is not supported; supported: {', '.join(SUPPORTED_TYPES)}"
            )
        self.model = model
        self.inner = model.model
        self.layers = list(self.inner.layers)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.scaling = self.head_dim**-0.5
        self.max_rows, self.max_len = max_rows, max_len
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        half = self.head_dim // 2
        self.sin_sign = torch.cat([-torch.ones(half), torch.ones(self.head_dim - half)]).to(self.device, self.dtype)
        self.norms = [(_fused_norm(la.input_layernorm, self.dtype),
                       _fused_norm(la.post_attention_layernorm, self.dtype)) for la in self.layers]
        self.final_norm = _fused_norm(self.inner.norm, self.dtype)
        # How each layer's parts run, resolved once (not per layer per step): q/k/v as one packed product
        # (packed_lora.FusedQKV) or three, qwen3's per-head norms, the MLP fused (packed_mlp.py) or the module.
        self.fused_qkv = [getattr(la.self_attn, "fused_qkv", None) for la in self.layers]
        self.qk_norms = [(la.self_attn.q_norm, la.self_attn.k_norm) if hasattr(la.self_attn, "q_norm") else None
                         for la in self.layers]
        self.mlps = [getattr(la.mlp, "fused_mlp", None) or _plus_module(la.mlp) for la in self.layers]
        self.alloc_len = 0
        self.initial_len = min(initial_len, max_len)
        self.K: list[torch.Tensor] = []
        self.V: list[torch.Tensor] = []
        self._grow(self.initial_len)

    # ---- cache management -------------------------------------------------------------------------------
    def _grow(self, need: int) -> None:
        if need <= self.alloc_len:
            return
        new_len = self.alloc_len or 64
        while new_len < need:
            new_len *= 2
        new_len = min(max(new_len, need), self.max_len)
        shape = (self.max_rows, self.n_kv, new_len, self.head_dim)
        K = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        V = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        if self.alloc_len:
            for i in range(len(self.layers)):
                K[i][:, :, : self.alloc_len] = self.K[i]
                V[i][:, :, : self.alloc_len] = self.V[i]
        self.K, self.V, self.alloc_len = K, V, new_len

    def ensure_capacity(self, length: int) -> None:
        assert length <= self.max_len, f"length {length} > max_len {self.max_len}"
        self._grow(length)

    def move_row(self, src: int, dst: int) -> None:
        """Copy cache row ``src`` into ``dst`` (used to keep live rows contiguous)."""
        for K, V in zip(self.K, self.V):
            K[dst].copy_(K[src])
            V[dst].copy_(V[src])

    def shrink(self) -> None:
        """Drop the cache back to its initial size when no row is live and it grew past 256 (frees memory after
        long prompts, and brings decode attention back to the short contiguous views it is fastest on; below
        that, the next requests reuse it instead of growing it again)."""
        if self.alloc_len > max(self.initial_len, 256):
            self.alloc_len = 0
            self._grow(self.initial_len)

    # ---- forward ----------------------------------------------------------------------------------------
    def _embed_positions(self, ids: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        h = self.inner.embed_tokens(ids)  # (N, T, H)
        cos, sin = self.inner.rotary_emb(h, pos)  # (N, T, D)
        return h, (cos.unsqueeze(2), (sin * self.sin_sign).unsqueeze(2))

    def _qkv(self, i: int, x: torch.Tensor, rope: tuple) -> tuple[torch.Tensor, ...]:
        """Layer i's q (N, heads, T, D), k and v (N, kv heads, T, D): views of one product when q/k/v are fused
        (the rotation runs once over q and k together)."""
        N, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        fused = self.fused_qkv[i]
        if fused is not None:
            qkv = fused.joint(x).view(N, T, H + 2 * KV, D)
            qk, v = qkv[:, :, : H + KV], qkv[:, :, H + KV:]
        else:
            attn = self.layers[i].self_attn
            q, k = attn.q_proj(x).reshape(N, T, H, D), attn.k_proj(x).reshape(N, T, KV, D)
            qk, v = torch.cat((q, k), dim=2), attn.v_proj(x).reshape(N, T, KV, D)
        if self.qk_norms[i] is not None:  # qwen3: per-head norms before the rotation
            q_norm, k_norm = self.qk_norms[i]
            qk = torch.cat((q_norm(qk[:, :, :H]), k_norm(qk[:, :, H:])), dim=2)
        qk = _rope(qk, *rope)  # (N, T, H + KV, D)
        return qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), v.transpose(1, 2)

    def _layer(self, i: int, h: torch.Tensor, rope: tuple, attend: Callable[..., torch.Tensor]) -> torch.Tensor:
        layer = self.layers[i]
        norm_in, norm_post = self.norms[i]
        q, k, v = self._qkv(i, norm_in(h), rope)
        o = attend(i, q, k, v)  # (N, heads, T, D)
        N, _, T, _ = o.shape
        h = h + layer.self_attn.o_proj(o.transpose(1, 2).reshape(N, T, self.n_heads * self.head_dim))
        return self.mlps[i](norm_post(h), h)  # h + mlp(norm_post(h)); packed_mlp.py when fused

    def _logits(self, h_last: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.final_norm(h_last)).float()  # (N, V)

    @torch.inference_mode()
    def prefill(self, rows: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Run whole prompts for cache ``rows`` (right-padded together); returns last-token logits (N, V)."""
        return self.prefill_scored(rows, prompts, [None] * len(prompts))[0]

    @torch.inference_mode()
    def prefill_scored(self, rows: list[int], prompts: list[list[int]], top: Sequence[int | None]
                       ) -> tuple[torch.Tensor, list[list[TokenLogprob] | None]]:
        """``prefill``, and for each prompt whose ``top`` is not None, the log-probability of every token after
        the first given the ones before it, with ``top`` alternatives each (``echo`` with ``logprobs``)."""
        lens = [len(p) for p in prompts]
        N, T = len(prompts), max(lens)
        self.ensure_capacity(T)
        pad = self.inner.config.pad_token_id or 0
        ids = torch.full((N, T), pad, dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, : len(p)] = torch.tensor(p, dtype=torch.long)
        ids = ids.to(self.device)
        pos = torch.arange(T, device=self.device).expand(N, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=self.device).tril()
        row_idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        h, rope = self._embed_positions(ids, pos)
        mask = causal.view(1, 1, T, T)  # padded queries attend causally; their outputs are never read
        plain = T <= MATH_ATTENTION_MAX_T and self.device.type == "cpu"
        bias = torch.zeros(T, T, device=self.device).masked_fill_(~causal, float("-inf")) if plain else None
        group = self.n_heads // self.n_kv

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.K[i][row_idx, :, :T] = k
            self.V[i][row_idx, :, :T] = v
            if not plain:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling,
                                                      enable_gqa=self.n_kv != self.n_heads)
            # a short prompt on CPU: plain products, a query group's heads stacked per KV head, scores in float32
            qg = q.reshape(N, self.n_kv, group * T, self.head_dim)
            scores = torch.matmul(qg, k.transpose(-1, -2)).view(N, self.n_kv, group, T, T)
            probs = torch.softmax(torch.add(bias, scores, alpha=self.scaling), dim=-1).to(v.dtype)
            out = torch.matmul(probs.view(N, self.n_kv, group * T, T), v)  # (N, kv, g * T, D)
            return out.view(N, self.n_heads, T, self.head_dim)

        for i in range(len(self.layers)):
            h = self._layer(i, h, rope, attend)
        last = torch.tensor([n - 1 for n in lens], device=self.device)
        scored = [None if k is None else self._score(h[r, : lens[r]], prompts[r], k) for r, k in enumerate(top)]
        return self._logits(h[torch.arange(N, device=self.device), last]), scored

    def _score(self, h: torch.Tensor, prompt: list[int], k: int) -> list[TokenLogprob]:
        """``prompt[j + 1]``'s log-probability from the hidden state at ``j`` (``h (len, H)``), in chunks."""
        nxt = torch.tensor(prompt[1:], dtype=torch.long, device=self.device)
        out: list[TokenLogprob] = []
        for s in range(0, len(nxt), SCORE_CHUNK):
            ids = nxt[s: s + SCORE_CHUNK]
            out += token_logprobs(self._logits(h[s: s + len(ids)]), ids, k, ranked=True)
        return out

    @torch.inference_mode()
    def decode(self, tokens: list[int], lens: list[int]) -> torch.Tensor:
        """One step for live rows ``0..n-1``: row r appends ``tokens[r]`` at position ``lens[r]``.

        Returns next-token logits (n, V). The caller then increments each row's length.
        """
        n = len(tokens)
        need = max(lens) + 1
        self.ensure_capacity(need)
        # Attending over the whole allocation makes K[:n] a contiguous view (no copy); worth it unless the
        # allocation is much longer than any live row (16 rows, SmolLM2: 145 us per layer over 128 slots, 207 over
        # 256; a strided view over the 96 needed costs 214: the cache starts small and doubles).
        L = self.alloc_len if self.alloc_len <= max(512, 2 * need) else need
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).view(n, 1)
        pos_t = torch.tensor(lens, dtype=torch.long, device=self.device)
        h, rope = self._embed_positions(ids, pos_t.view(n, 1))
        mask = (torch.arange(L, device=self.device).view(1, L) <= pos_t.view(n, 1)).view(n, 1, 1, L)
        rows = torch.arange(n, device=self.device)

        group, kv, D = self.n_heads // self.n_kv, self.n_kv, self.head_dim
        # The mask as an additive bias in the model's dtype, one (g, L) block per row and KV head (built once a step)
        bias = torch.zeros(n, 1, 1, L, dtype=self.dtype, device=self.device).masked_fill_(~mask, float("-inf"))
        bias = bias.expand(n, kv, group, L).reshape(n * kv, group, L)
        # Where each row's new k/v go in a layer's cache seen as (rows * kv * L_alloc, D): one index_copy_.
        heads = torch.arange(kv, device=self.device).view(1, -1)
        at = ((rows.view(n, 1) * kv + heads) * self.alloc_len + pos_t.view(n, 1)).view(-1)  # (n * kv,)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            K, V = self.K[i], self.V[i]
            K.view(-1, D).index_copy_(0, at, k.reshape(-1, D))
            V.view(-1, D).index_copy_(0, at, v.reshape(-1, D))
            # One query per row: batched products over (row, KV head), its group's heads stacked, beat the fused
            # kernel; scale and mask ride on the first (baddbmm), the softmax runs in float32 as HF's does.
            keys = K[:n, :, :L].reshape(n * kv, L, D)  # views: rows' kv heads are adjacent in the cache
            scores = torch.baddbmm(bias, q.reshape(n * kv, group, D), keys.transpose(1, 2), alpha=self.scaling)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)  # (n * kv, g, L)
            out = torch.bmm(probs, V[:n, :, :L].reshape(n * kv, L, D))  # (n * kv, g, D)
            return out.view(n, self.n_heads, 1, D)

        for i in range(len(self.layers)):
            h = self._layer(i, h, rope, attend)
        return self._logits(h[:, -1])

    @torch.inference_mode()
    def pooled_embedding(self, prompt: list[int]) -> torch.Tensor:
        """Mean of the prompt's input embeddings (H,), float32: the input of GainLoRA gates."""
        ids = torch.tensor(prompt, dtype=torch.long, device=self.device)
        return self.inner.embed_tokens(ids).float().mean(0)
