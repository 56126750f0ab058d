"""Every method trains through ``clora train`` on the tiny model and 2 real tasks; outputs, resume, replay."""

import json

import pytest
import torch
from safetensors.torch import load_file

from continual.evaluate import greedy_generate
from continual.lora_layer import GateContext
from server.cli import main

from .helpers import ROOT, tiny

METHODS = ["seq", "per-task", "multitask", "olora", "clora", "gainlora"]


def _args(data, tiny_dir, out, method, *extra):
    return ["train", "--data", str(data), "--tasks", "agnews,amazon", "--method", method, "--max-train", "4",
            "--max-test", "2", "--max-input-chars", "100", "--batch-size", "2", "--eval-batch-size", "4",
            "--max-new-tokens", "3", "--out", str(out), "--base-model", str(tiny_dir), "--device", "cpu",
            "--dtype", "float32", "--cache-dir", str(ROOT / ".model_cache"), "--no-progress", "--num-threads", "1", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_train_writes_outputs(tmp_path, tiny_llama_dir, cl_data_dir, method):
    out = tmp_path / method
    assert main(_args(cl_data_dir, tiny_llama_dir, out, method)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == method and m["tasks"] == ["agnews", "amazon"]
    assert len(m["accuracy"]) == 2 and all(len(r) == 2 for r in m["accuracy"])
    assert {"AP", "FT", "BWT", "config", "seconds"} <= set(m)
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "ap_over_tasks.png").stat().st_size > 0
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and {p["task"] for p in preds} == {"agnews", "amazon"}
    assert all(p["prompt"].endswith("\nAnswer:") for p in preds)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["task_00", "task_01"]
    names = sorted(p.name for p in (out / "adapters").iterdir())
    assert names == (["per-task-agnews", "per-task-amazon"] if method == "per-task" else [method])


def test_predictions_reproduced_from_exported_adapter(tmp_path, tiny_llama_dir, cl_data_dir):
    """The prompt in predictions.jsonl, fed to base + exported PEFT adapter, gives the recorded prediction."""
    from peft import PeftModel

    out = tmp_path / "seq"
    assert main(_args(cl_data_dir, tiny_llama_dir, out, "seq", "--lr", "5e-2")) == 0
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    loaded = tiny(tiny_llama_dir)
    model = PeftModel.from_pretrained(loaded.model, str(out / "adapters" / "seq"))

    class Plain:  # no gates
        ctx = GateContext()

        def set_batch(self, ids):
            pass

    got = greedy_generate(model, loaded.tokenizer, Plain(), [p["prompt"] for p in preds], 3, 1)
    assert got == [p["prediction"] for p in preds]


@pytest.mark.slow
def test_resume_continues_after_last_checkpoint(tmp_path, tiny_llama_dir, cl_data_dir):
    out = tmp_path / "run"
    assert main(_args(cl_data_dir, tiny_llama_dir, out, "seq", "--lr", "1e-2")) == 0
    first = json.loads((out / "metrics.json").read_text())
    adapter_1 = load_file(str(out / "adapters" / "seq" / "adapter_model.safetensors"))
    ck0 = (out / "checkpoints" / "task_00" / "state.safetensors").stat().st_mtime_ns
    import shutil

    shutil.rmtree(out / "checkpoints" / "task_01")  # as if killed during task 2
    assert main(_args(cl_data_dir, tiny_llama_dir, out, "seq", "--lr", "1e-2")) == 0
    second = json.loads((out / "metrics.json").read_text())
    assert (out / "checkpoints" / "task_00" / "state.safetensors").stat().st_mtime_ns == ck0  # not retrained
    assert second["accuracy"] == first["accuracy"]
    adapter_2 = load_file(str(out / "adapters" / "seq" / "adapter_model.safetensors"))
    assert all(torch.equal(adapter_1[k], adapter_2[k]) for k in adapter_1)
    # a different config refuses to resume into the same directory
    assert main(_args(cl_data_dir, tiny_llama_dir, out, "seq", "--lr", "2e-2")) == 2


def test_rehearsal_replays_earlier_tasks(tiny_llama_dir, cl_data_dir):
    from continual.runner import _rehearsal

    from .helpers import tiny_method

    _, m = tiny_method(tiny_llama_dir, cl_data_dir, "seq", rehearsal=0.5)
    replay = _rehearsal(m, m.tasks, 1, 4, m.cfg)
    assert len(replay) == 2 and all(ex.task == "agnews" for ex in replay)
    assert _rehearsal(m, m.tasks, 0, 4, m.cfg) == []


def test_multitask_joint_only_trains_just_the_joint_model(tmp_path, tiny_llama_dir, cl_data_dir):
    out = tmp_path / "mt"
    args = _args(cl_data_dir, tiny_llama_dir, out, "multitask", "--joint-only", "--lr", "5e-2")
    args[args.index("--tasks") + 1] = "agnews,amazon,dbpedia"
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["joint_only"] is True and len(m["accuracy"]) == 3
    assert m["accuracy"][0] == m["accuracy"][1]  # both the untrained start: evaluated once
    first = load_file(str(out / "checkpoints" / "task_00" / "state.safetensors"))
    last = load_file(str(out / "checkpoints" / "task_02" / "state.safetensors"))
    b_keys = [k for k in first if ".B." in k]
    assert b_keys and all(torch.count_nonzero(first[k]) == 0 for k in b_keys)  # stage 0: untrained (B = 0)
    assert any(torch.count_nonzero(last[k]) > 0 for k in b_keys)  # the joint stage trained
    stage0 = json.loads((out / "checkpoints" / "task_00" / "state.json").read_text())
    assert stage0["last_loss"] != stage0["last_loss"]  # NaN: no training step at stage 0


@pytest.mark.slow
def test_evaluate_reruns_the_final_checkpoint(tmp_path, tiny_llama_dir, cl_data_dir):
    """`clora evaluate` loads the run's last checkpoint anew and reproduces its final evaluation (same dtype);
    bfloat16 training re-evaluated in float32 writes its own predictions beside the run's, which stay as they were."""
    out = tmp_path / "gl"
    assert main(_args(cl_data_dir, tiny_llama_dir, out, "gainlora", "--lr", "5e-2")) == 0
    m = json.loads((out / "metrics.json").read_text())
    run_preds = (out / "predictions.jsonl").read_text()
    again = ["evaluate", "--run", str(out), "--data", str(cl_data_dir), "--base-model", str(tiny_llama_dir),
             "--device", "cpu", "--cache-dir", str(ROOT / ".model_cache"), "--no-progress", "--num-threads", "1"]
    assert main(again) == 0
    ev = json.loads((out / "evaluations" / "float32" / "evaluation.json").read_text())
    assert ev["dtype"] == "float32" and ev["tasks"] == m["tasks"] and ev["accuracy"] == m["accuracy"][-1]
    assert (out / "evaluations" / "float32" / "predictions.jsonl").read_text() == run_preds
    bf = tmp_path / "bf"
    assert main([*_args(cl_data_dir, tiny_llama_dir, bf, "seq", "--lr", "5e-2"), "--dtype", "bfloat16"]) == 0
    bf_preds = (bf / "predictions.jsonl").read_text()
    assert main([*again[:2], str(bf), *again[3:], "--out", str(tmp_path / "bf32")]) == 0
    assert json.loads((tmp_path / "bf32" / "evaluation.json").read_text())["dtype"] == "float32"
    assert len((tmp_path / "bf32" / "predictions.jsonl").read_text().splitlines()) == len(bf_preds.splitlines())
    assert (bf / "predictions.jsonl").read_text() == bf_preds and not (bf / "evaluations").exists()


def test_evaluate_names_what_is_missing(tmp_path, tiny_llama_dir, cl_data_dir, capsys):
    assert main(["evaluate", "--run", str(tmp_path), "--data", str(cl_data_dir), "--no-progress"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
