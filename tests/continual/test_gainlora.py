"""GainLoRA: padding-invariant gates, orthogonal key init, GPM projection, and the served kind reproducing it."""

import torch

from adapters_store.kinds import load_adapter_dir
from continual.batching import prompt_ids
from continual.methods.gainlora import pooled_prompt

from .helpers import logits, randomize, tiny_method


def _record_task(m, t):
    m.start_recording()
    m.set_batch(prompt_ids(m_tok(m), [ex.prompt for ex in m.tasks[t].train]))
    m.finish_recording(t)


def m_tok(m):
    return m._tok


def _setup(tiny_llama_dir, cl_data_dir):
    loaded, m = tiny_method(tiny_llama_dir, cl_data_dir, "gainlora", n_train=6)
    m._tok = loaded.tokenizer
    return loaded, m


def _at_second_task(tiny_llama_dir, cl_data_dir):
    """Task 0 done and memorised (U_h: its gate outputs' basis), task 1 begun."""
    loaded, m = _setup(tiny_llama_dir, cl_data_dir)
    m.begin_task(0)
    m.end_task(0)
    _record_task(m, 0)
    m.begin_task(1)
    return loaded, m, m.bases["h"]


def test_gate_ignores_padding(tiny_llama_dir, cl_data_dir):
    loaded, m = _setup(tiny_llama_dir, cl_data_dir)
    m.begin_task(0)
    short, long = "Answer: yes", m.tasks[0].train[0].prompt
    ids = prompt_ids(loaded.tokenizer, [short, long])
    emb = loaded.model.get_input_embeddings()
    alone = pooled_prompt(emb, ids[:1], m.device)
    batched = pooled_prompt(emb, ids, m.device)
    assert torch.allclose(alone[0], batched[0], atol=1e-6)
    # the engine's definition: plain mean of embed_tokens over tokenizer(prompt)["input_ids"]
    ref = emb(torch.tensor(ids[0])).float().mean(0)
    assert torch.allclose(alone[0], ref, atol=1e-6)
    assert torch.allclose(m.gate(alone)[0], m.gate(batched)[0], atol=1e-6)


def test_new_key_orthogonal_and_projection_keeps_old_gates(tiny_llama_dir, cl_data_dir):
    loaded, m, U_h = _at_second_task(tiny_llama_dir, cl_data_dir)
    new_key = m.gate.keys[-1].detach()
    assert torch.allclose(U_h.t() @ new_key, torch.zeros(U_h.shape[1]), atol=1e-5)

    old = pooled_prompt(loaded.model.get_input_embeddings(),
                        prompt_ids(loaded.tokenizer, [ex.prompt for ex in m.tasks[0].train]), m.device)
    in_span = (old @ m.bases["p"]) @ m.bases["p"].t()  # old prompts' component inside the protected subspace
    before_h = m.gate.output(in_span).detach()
    before_g = m.gate(old).detach()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # an arbitrary (large) update of everything trainable, then the projection
        m.gate.W1.add_(torch.randn(m.gate.W1.shape, generator=g) * 0.5)
        m.gate.W2.add_(torch.randn(m.gate.W2.shape, generator=g) * 0.5)
        m.gate.keys[-1].add_(torch.randn(m.gate.keys[-1].shape, generator=g))
    m.after_step()
    assert torch.allclose(m.gate.output(in_span), before_h, atol=1e-4)  # exact inside the subspace
    after_g = m.gate(old).detach()
    assert (after_g[:, 0] - before_g[:, 0]).abs().max() < 0.05  # old task's gate barely moves (GPM residual)
    h_old = m.gate.output(old).detach()
    cos_new = torch.nn.functional.cosine_similarity(h_old, m.gate.keys[-1].detach()[None], dim=-1)
    assert cos_new.abs().max() < 0.1  # the new branch stays (almost) shut for old inputs
    # without the projection the same update moves the old gate a lot
    m.bases = {}
    with torch.no_grad():
        m.gate.W1.add_(torch.randn(m.gate.W1.shape, generator=g) * 0.5)
        m.gate.W2.add_(torch.randn(m.gate.W2.shape, generator=g) * 0.5)
    assert (m.gate(old).detach()[:, 0] - before_g[:, 0]).abs().max() > 0.05


def _reference_forward(base_model, tokenizer, weights, prompt):
    """Apply ΔW from AdapterWeights with forward hooks, gates from the plain mean prompt embedding."""
    ids = tokenizer(prompt)["input_ids"]
    pooled = base_model.get_input_embeddings()(torch.tensor(ids)).float().mean(0)  # (H,)
    g = weights.gate(pooled)  # (n,)
    gexp = torch.repeat_interleave(g, torch.tensor(weights.segments))  # (R,)
    hooks = []
    for path, pair in weights.modules.items():
        mod = base_model.get_submodule(path)

        def hook(_m, inp, out, pair=pair):
            u = inp[0].float() @ pair.A.t() * gexp  # (B, T, R)
            return out + pair.scale * (u @ pair.B.t()).to(out.dtype)

        hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            return base_model(input_ids=torch.tensor([ids])).logits[0].float()
    finally:
        for h in hooks:
            h.remove()


def test_gainlora_export_reproduces_trainer(tmp_path, tiny_llama_dir, cl_data_dir):
    from .helpers import tiny

    loaded, m = _setup(tiny_llama_dir, cl_data_dir)
    for t in range(2):
        m.begin_task(t)
        randomize(m, t, gen_seed=t + 5)
        m.end_task(t)
        _record_task(m, t)
    [(name, path)] = m.export(tmp_path / "adapters", 1)
    w = load_adapter_dir(path)
    assert w.kind == "gainlora" and w.segments == (8, 8) and w.rank == 16
    base = tiny(tiny_llama_dir).model
    for ex in (m.tasks[0].test[0], m.tasks[1].test[0]):
        m.set_batch(prompt_ids(loaded.tokenizer, [ex.prompt]))
        want = logits(loaded.model, loaded.tokenizer, ex.prompt)
        got = _reference_forward(base, loaded.tokenizer, w, ex.prompt)
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    pooled = torch.randn(2, base.get_input_embeddings().embedding_dim)
    assert w.gate(pooled[0]).shape == (2,) and w.gate(pooled).shape == (2, 2)


def test_gate_trains_at_its_own_learning_rate(tiny_llama_dir, cl_data_dir):
    loaded, m = tiny_method(tiny_llama_dir, cl_data_dir, "gainlora", n_train=6, lr=1e-4, gate_lr=2e-2)
    m.begin_task(0)
    m.end_task(0)
    params = m.begin_task(1)
    groups = m.param_groups(params)
    gate = {id(p) for p in (m.gate.W1, m.gate.W2, m.gate.keys[-1])}
    by_lr = {g.get("lr", m.cfg.lr): {id(p) for p in g["params"]} for g in groups}
    assert by_lr == {1e-4: {id(p) for p in params} - gate, 2e-2: gate}
    opt = torch.optim.AdamW(groups, lr=m.cfg.lr, weight_decay=0.0)  # as the runner builds it
    key0 = m.gate.keys[-1].detach().clone()
    m.gate.keys[-1].grad = torch.ones_like(key0)
    for p in params[:2]:
        p.grad = torch.zeros_like(p)
    opt.step()  # Adam's first step moves every coordinate by about its lr
    assert torch.allclose((m.gate.keys[-1] - key0).abs(), torch.full_like(key0, 2e-2), rtol=1e-3)


def test_new_key_points_at_the_new_task_and_stays_orthogonal(tiny_llama_dir, cl_data_dir):
    loaded, m, U_h = _at_second_task(tiny_llama_dir, cl_data_dir)
    random_key = m.gate.keys[-1].detach().clone()
    new_ids = prompt_ids(loaded.tokenizer, [ex.prompt for ex in m.tasks[1].train])
    emb = loaded.model.get_input_embeddings()
    new = pooled_prompt(emb, new_ids, m.device)
    gate_random = m.gate(new)[:, 1].detach()
    m.set_batch(new_ids)  # the task's first training batch aims the key
    key = m.gate.keys[-1].detach()
    assert torch.allclose(U_h.t() @ key, torch.zeros(U_h.shape[1]), atol=1e-5)
    aim = m.gate.output(new).detach().mean(0)
    aim = aim - U_h @ (U_h.t() @ aim)
    assert torch.allclose(key, aim / aim.norm(), atol=1e-5)
    assert m.gate(new)[:, 1].mean() > gate_random.mean()  # opens more on its own task than a random key
    assert torch.equal(m._start["key"], key)  # the GPM projection of later steps starts from the aimed key
    m.set_batch(prompt_ids(loaded.tokenizer, [ex.prompt for ex in m.tasks[0].train]))
    assert torch.equal(m.gate.keys[-1].detach(), key)  # aimed once per task
    assert not torch.equal(key, random_key)


def test_first_task_trains_its_key_but_not_the_gate_mlp(tiny_llama_dir, cl_data_dir):
    """With one branch there is nothing to tell apart: W1, W2 wait for task 1, so h keeps telling prompts apart."""
    loaded, m = _setup(tiny_llama_dir, cl_data_dir)
    params = {id(p) for p in m.begin_task(0)}
    assert id(m.gate.keys[0]) in params
    assert not {id(m.gate.W1), id(m.gate.W2)} & params
    assert not (m.gate.W1.requires_grad or m.gate.W2.requires_grad)
    m.end_task(0)
    params = {id(p) for p in m.begin_task(1)}
    assert {id(m.gate.W1), id(m.gate.W2), id(m.gate.keys[1])} <= params
    assert m.gate.W1.requires_grad and m.gate.W2.requires_grad


def test_new_branch_rows_stay_orthogonal_to_old_ones(tiny_llama_dir, cl_data_dir):
    """O-LoRA's constraint held exactly: A_old A_newᵀ = 0 at the start and after Adam steps on any gradient."""
    loaded, m = _setup(tiny_llama_dir, cl_data_dir)
    m.begin_task(0)
    m.end_task(0)
    params = m.begin_task(1)
    assert m.penalty() is None

    def overlap():
        return max((torch.cat(list(layer.As)[:-1]) @ layer.As[-1].t()).abs().max().item()
                   for layer in m.layers.values())

    assert overlap() < 1e-5
    opt = torch.optim.AdamW(m.param_groups(params), lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    before = {id(p): p.detach().clone() for p in params}
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        m.after_step()
    assert overlap() < 1e-5
    new_A = next(iter(m.layers.values())).As[-1]
    assert (new_A - before[id(new_A)]).abs().max() > 1e-3  # it trains, within the free directions
