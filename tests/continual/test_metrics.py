"""AP / FT / BWT on a hand-computed matrix, exact-match normalisation, prompt construction, GPM utilities."""

import pytest
import torch

from continual.data import build_prompt, resolve_tasks
from continual.errors import ContinualError
from continual.gpm import gpm_update, gpm_update_cov, project_off
from continual.metrics import cl_metrics, exact_match, normalise


def test_cl_metrics_hand_matrix():
    acc = [[0.8, 0.1, 0.0],
           [0.5, 0.9, 0.2],
           [0.4, 0.6, 0.7]]
    m = cl_metrics(acc)
    assert m["AP"] == pytest.approx((0.4 + 0.6 + 0.7) / 3)
    # FT: task0 max(0.8, 0.5) - 0.4 = 0.4; task1 max(0.1, 0.9) - 0.6 = 0.3
    assert m["FT"] == pytest.approx((0.4 + 0.3) / 2)
    # BWT: (0.4 - 0.8) + (0.6 - 0.9)
    assert m["BWT"] == pytest.approx((-0.4 - 0.3) / 2)


def test_cl_metrics_single_task_and_bad_shape():
    assert cl_metrics([[0.5]]) == {"AP": 0.5, "FT": 0.0, "BWT": 0.0}
    with pytest.raises(ValueError):
        cl_metrics([[0.5, 0.2]])


def test_normalise_and_exact_match():
    assert normalise("  Very  Positive.\n") == "very positive"
    assert exact_match(" World", "world")
    assert not exact_match("Sports news", "Sports")


def test_prompt_format_and_task_resolution(cl_data_dir):
    p = build_prompt("Topic?\n", ["a", "b"], "Title: x\nText: y\n", 1000)
    assert p == "Topic?\nOptions: a, b\nTitle: x\nText: y\nAnswer:"
    assert resolve_tasks(cl_data_dir, "standard_order1", None) == ["dbpedia", "amazon", "yahoo", "agnews"]
    with pytest.raises(ContinualError):
        resolve_tasks(cl_data_dir, None, "agnews,nope")
    with pytest.raises(ContinualError):
        resolve_tasks(cl_data_dir, "standard_order1", "agnews")


def test_gpm_basis_orthonormal_and_grows():
    g = torch.Generator().manual_seed(0)
    X1 = torch.randn(200, 3, generator=g) @ torch.randn(3, 10, generator=g)  # rank-3 activations in R^10
    U = gpm_update(None, X1, 0.999)
    assert U.shape[1] == 3
    assert torch.allclose(U.t() @ U, torch.eye(3), atol=1e-5)
    assert torch.allclose(project_off(X1, U), torch.zeros_like(X1), atol=1e-3)  # X1 lies in span(U)
    X2 = torch.randn(200, 2, generator=g) @ torch.randn(2, 10, generator=g)
    U2 = gpm_update_cov(U, X2.t() @ X2, 0.999)
    assert U2.shape[1] == 5 and torch.allclose(U2[:, :3], U)
    assert torch.allclose(U2.t() @ U2, torch.eye(5), atol=1e-4)


def test_ewc_penalty_and_consolidation():
    from continual.ewc import EWC

    ewc = EWC(2.0)
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    assert ewc.penalty({"p": p}) is None  # nothing consolidated yet
    ewc.consolidate({"p": p}, {"p": torch.tensor([4.0, 0.0])}, n=2)  # Fisher = [2, 0]
    with torch.no_grad():
        p.add_(torch.tensor([1.0, 5.0]))
    # λ/2 · Σ F (θ − θ*)² = 1 · (2·1 + 0·25)
    assert float(ewc.penalty({"p": p})) == pytest.approx(2.0)
    restored = EWC(2.0)
    restored.load(ewc.state(), torch.device("cpu"))
    assert float(restored.penalty({"p": p})) == pytest.approx(2.0)
