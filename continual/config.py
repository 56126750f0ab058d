"""The trainer's options, one validated dataclass shared by the CLI, the runner and the checkpoints."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields

from .data import prompt_style_problem
from .errors import ContinualError


@dataclass
class TrainConfig:
    """Options every method takes where it applies (unused ones are ignored by a method and recorded anyway)."""

    method: str = "seq"
    rank: int = 8  # LoRA rank per branch / of the shared pair
    alpha: float = 16.0  # scale = alpha / rank
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    lr: float = 5e-4
    epochs: int = 1
    batch_size: int = 8
    seed: int = 0
    rehearsal: float = 0.0  # replay this fraction (of the current task's size) of earlier tasks' train examples
    ewc_lambda: float = 0.0  # EWC penalty on parameters shared across tasks (0 = off)
    max_train: int | None = None
    max_test: int | None = None
    max_input_chars: int = 1000
    prompt_style: str = "instruction"  # "instruction" (task instruction + options) | "raw" (input only)
    max_new_tokens: int = 8
    eval_batch_size: int = 32
    olora_lambda: float = 0.5  # O-LoRA λ1 (gainlora keeps A_old A_newᵀ = 0 exactly instead)
    clora_lambda: float = 0.01  # C-LoRA orthogonality penalty weight
    routing_lr: float | None = None  # C-LoRA: learning rate of R_δ (None: lr)
    clora_project_a: bool = True  # C-LoRA: later tasks also train A, its change kept off old tasks' inputs (GPM);
    #                               False: only R_δ trains after task 0 (AP 0.445 against 0.5125, FT 2.3 against 1.7)
    clora_project_b: bool = True  # C-LoRA: later tasks also train B, its change kept off the codes old tasks feed it
    #                               (r 8: AP 0.625 against 0.5125 with B frozen; r 32: 0.680 against 0.6175)
    gate_hidden: int = 100  # GainLoRA gate MLP hidden size
    gate_dim: int = 64  # GainLoRA gate output / key size
    gate_lr: float | None = None  # GainLoRA gate (W1, W2, new key) learning rate (None: lr); 5e-3 opened new gates
    #                               more (0.29 -> 0.40 on their own task) but did not raise AP (0.5525 vs 0.5575)
    gate_threshold: float = 0.97  # GPM energy threshold (+0.003 per task) of the gate's input/output memories
    joint_only: bool = False  # multitask: train only the last stage, the joint model on every task's data (the
    #                           earlier rows of its accuracy matrix are then the untrained start, i.e. the base model)
    name: str = ""  # adapter name prefix for exports and registration (default: the method name)

    def __post_init__(self) -> None:
        problems = []
        if self.rank < 1:
            problems.append(f"rank must be >= 1 (got {self.rank})")
        if self.alpha <= 0:
            problems.append(f"alpha must be > 0 (got {self.alpha})")
        if min(self.lr, self.gate_lr or self.lr, self.routing_lr or self.lr) <= 0:
            problems.append(f"learning rates must be > 0 (got lr {self.lr}, gate lr {self.gate_lr}, "
                            f"routing lr {self.routing_lr})")
        if not 0.0 < self.gate_threshold < 1.0:
            problems.append(f"gate threshold must be in (0, 1) (got {self.gate_threshold})")
        if self.epochs < 1 or self.batch_size < 1:
            problems.append("epochs and batch size must be >= 1")
        if not 0.0 <= self.rehearsal <= 1.0:
            problems.append(f"rehearsal ratio must be in [0, 1] (got {self.rehearsal})")
        if self.ewc_lambda < 0 or self.olora_lambda < 0 or self.clora_lambda < 0:
            problems.append("penalty weights (ewc, olora, clora lambdas) must be >= 0")
        if not self.target_modules:
            problems.append("target modules must not be empty")
        if (problem := prompt_style_problem(self.prompt_style)) is not None:
            problems.append(problem)
        if problems:
            raise ContinualError("; ".join(problems))
        if not self.name:
            self.name = self.method

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def upgrade_json(cls, saved: dict) -> dict:
        """A config dict written by an older version, with fields added since then at their defaults.

        Lets a checkpoint saved before e.g. ``prompt_style`` existed resume under the same (default) settings.
        """
        added = {f.name: f.default for f in fields(cls) if f.name not in saved and f.default is not MISSING}
        return {**saved, **added}
