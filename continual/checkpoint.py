"""Per-task checkpoints (safetensors + JSON, never pickle) so an interrupted run resumes after its last task.

``<out>/checkpoints/task_<t>/state.safetensors`` holds the method's tensors, ``state.json`` the method meta, the
run config, task list, accuracy rows so far and elapsed seconds. Written atomically (tmp dir + rename).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def checkpoint_dir(out_dir: Path, t: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"task_{t:02d}"


def save_checkpoint(out_dir: Path, t: int, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    final = checkpoint_dir(out_dir, t)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def latest_checkpoint(out_dir: Path) -> tuple[int, dict[str, torch.Tensor], dict] | None:
    """The last completed task's (t, tensors, meta), or None when there is no checkpoint."""
    root = Path(out_dir) / "checkpoints"
    done = sorted(p for p in root.glob("task_*") if (p / "state.json").is_file()) if root.is_dir() else []
    if not done:
        return None
    last = done[-1]
    meta = json.loads((last / "state.json").read_text())
    return int(last.name.split("_")[1]), load_file(str(last / "state.safetensors")), meta
