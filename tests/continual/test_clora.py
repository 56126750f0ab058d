"""C-LoRA claims (docs/clora.md): versions chain exactly, R_δ ⟂ U leaves old inputs untouched, the penalty
reduces overlap, only R_δ trains after the first task, or R_δ, A and B with A's change kept off old inputs and
B's off the codes old tasks feed it."""

import pytest
import torch

from continual.batching import answer_loss, make_batch

from .helpers import logits, randomize, tiny_method


def _finish(m, loaded, t):
    m.end_task(t)
    m.start_recording()
    b = make_batch(loaded.tokenizer, m.tasks[t].train, m.device)
    m.ctx.token_mask = b.attention_mask.bool()
    with torch.no_grad():
        loaded.model(input_ids=b.input_ids, attention_mask=b.attention_mask)
    m.ctx.token_mask = None
    m.finish_recording(t)


def test_new_task_starts_from_previous_version_and_only_routing_trains(tiny_llama_dir, cl_data_dir):
    loaded, m = tiny_method(tiny_llama_dir, cl_data_dir, "clora", clora_project_a=False, clora_project_b=False)
    m.begin_task(0)
    randomize(m, 0)
    prompt = m.tasks[0].test[0].prompt
    v0 = logits(loaded.model, loaded.tokenizer, prompt)
    _finish(m, loaded, 0)
    params = m.begin_task(1)
    assert all(p.shape == (8, 8) for p in params)  # only R_δ per module
    assert torch.allclose(logits(loaded.model, loaded.tokenizer, prompt), v0, atol=1e-5)


def test_routing_orthogonal_to_old_subspace_keeps_old_updates(tiny_llama_dir, cl_data_dir):
    loaded, m = tiny_method(tiny_llama_dir, cl_data_dir, "clora")
    m.begin_task(0)
    randomize(m, 0)
    _finish(m, loaded, 0)
    m.begin_task(1)
    path, layer = next(iter(m.layers.items()))
    assert 0 < m.bases[path].shape[1] <= 8
    U, _ = torch.linalg.qr(torch.randn(8, 4))  # a 4-dim old subspace, so some directions stay free
    m.bases[path] = U  # (r, k)
    old_dw = layer.delta_weight().detach().clone()
    with torch.no_grad():  # an R_δ with R_δ U = 0
        M = torch.randn(8, 8)
        layer.R_delta.copy_(M @ (torch.eye(8) - U @ U.t()))
    A = layer.As[0].detach()
    x = torch.linalg.pinv(A) @ (U @ torch.randn(U.shape[1], 3))  # inputs with A x in span(U)  (in, 3)
    assert torch.allclose(layer.delta_weight().detach() @ x, old_dw @ x, atol=1e-4)
    assert m.overlap() < 1e-8
    y = torch.randn(A.shape[1], 3)  # a generic input does see the change
    assert not torch.allclose(layer.delta_weight().detach() @ y, old_dw @ y, atol=1e-4)


@pytest.mark.slow
def test_penalty_reduces_overlap(tiny_llama_dir, cl_data_dir):
    overlaps = {}
    for lam in (0.0, 1.0):
        loaded, m = tiny_method(tiny_llama_dir, cl_data_dir, "clora", clora_lambda=lam)
        m.begin_task(0)
        randomize(m, 0)
        _finish(m, loaded, 0)
        _train_steps(m, loaded, m.begin_task(1), 5)
        overlaps[lam] = m.overlap()
    assert overlaps[1.0] < 0.5 * overlaps[0.0], overlaps


def _train_steps(m, loaded, params, steps: int) -> None:
    """Task 1's training loop as the runner runs it (penalty, gradient surgery, step, parameter surgery)."""
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=3e-2)
    torch.manual_seed(0)
    b = make_batch(loaded.tokenizer, m.tasks[1].train, m.device)
    for _ in range(steps):
        loss = answer_loss(loaded.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b.labels)
        pen = m.penalty()
        total = loss + pen if pen is not None else loss
        opt.zero_grad()
        total.backward()
        m.after_backward()
        opt.step()
        m.after_step()


def test_projected_a_trains_off_old_inputs(tiny_llama_dir, cl_data_dir):
    loaded, m = tiny_method(tiny_llama_dir, cl_data_dir, "clora", clora_project_b=False)  # projected A: default
    m.begin_task(0)
    randomize(m, 0)
    _finish(m, loaded, 0)
    params = m.begin_task(1)
    path, layer = next(iter(m.layers.items()))
    assert {id(layer.As[0]), id(layer.R_delta)} <= {id(p) for p in params}
    assert id(layer.Bs[0]) not in {id(p) for p in params}  # B stays frozen
    Ux = m.input_bases[path]  # (in, k_x)
    assert 0 < Ux.shape[1] < layer.in_features
    A0 = layer.As[0].detach().clone()
    _train_steps(m, loaded, params, 3)
    dA = layer.As[0].detach() - A0
    assert dA.norm() > 1e-3  # A learned in the free directions
    assert (dA @ Ux).norm() < 1e-5 * dA.norm()  # and not in the old tasks' input subspace
    x = Ux @ torch.randn(Ux.shape[1], 3)  # old-task-like inputs see the same A x
    assert torch.allclose(layer.As[0].detach() @ x, A0 @ x, atol=1e-5)


def test_projected_b_trains_off_old_codes(tiny_llama_dir, cl_data_dir):
    loaded, m = tiny_method(tiny_llama_dir, cl_data_dir, "clora")  # projected A and B are the default
    m.begin_task(0)
    randomize(m, 0)
    _finish(m, loaded, 0)
    path, layer = next(iter(m.layers.items()))
    U, _ = torch.linalg.qr(torch.randn(8, 5))  # a 5-dim old code subspace: 3 directions stay free for B
    m.bases = {p: U for p in m.layers}
    params = m.begin_task(1)
    assert {id(layer.As[0]), id(layer.Bs[0]), id(layer.R_delta)} <= {id(p) for p in params}
    B0, R_old = layer.Bs[0].detach().clone(), layer.R_old.clone()
    _train_steps(m, loaded, params, 3)
    dB = layer.Bs[0].detach() - B0
    assert dB.norm() > 1e-3  # B learned on the free code directions
    codes = R_old @ U @ torch.randn(5, 4)  # what old tasks' inputs feed B
    assert (dB @ codes).norm() < 1e-5 * dB.norm() * codes.norm()
    assert torch.allclose(layer.Bs[0].detach() @ codes, B0 @ codes, atol=1e-5)
    m.end_task(1)
    m.bases = {p: torch.eye(8) for p in m.layers}  # every code direction taken: B has no room and stays frozen
    assert id(layer.Bs[0]) not in {id(p) for p in m.begin_task(2)}


def test_routing_trains_at_its_own_learning_rate(tiny_llama_dir, cl_data_dir):
    loaded, m = tiny_method(tiny_llama_dir, cl_data_dir, "clora", lr=1e-4, routing_lr=3e-2, clora_project_a=False)
    m.begin_task(0)
    m.end_task(0)
    params = m.begin_task(1)
    routing = {id(layer.R_delta) for layer in m.layers.values()}
    groups = m.param_groups(params)
    assert {g.get("lr", m.cfg.lr): len(g["params"]) for g in groups} == {1e-4: 0, 3e-2: len(routing)}
    assert {id(p) for p in groups[1]["params"]} == routing == {id(p) for p in params}  # later tasks: R_δ only


def test_a_stays_frozen_without_the_old_tasks_input_subspace(tiny_llama_dir, cl_data_dir):
    """A run resumed from a checkpoint written before ``clora_project_a`` has no input bases: A must not train
    unprotected, nor get a basis that covers only the tasks after the resume."""
    loaded, m = tiny_method(tiny_llama_dir, cl_data_dir, "clora", clora_project_b=False)
    m.begin_task(0)
    randomize(m, 0)
    _finish(m, loaded, 0)
    m.input_bases = {}  # as loaded from such a checkpoint
    params = m.begin_task(1)
    assert all(p.shape == (8, 8) for p in params)
    _finish(m, loaded, 1)
    assert m.input_bases == {}
