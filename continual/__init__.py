"""How adapters are made: continual-learning methods, the task-sequence runner and the ``clora train`` CLI.

Public API: ``continual.runner.run(TrainConfig, RunSpec) -> metrics``, ``continual.config.TrainConfig``,
``continual.methods.get_method/known_methods/register_method``, ``continual.metrics.cl_metrics``,
``continual.cli.add_train_parser``. Served formats: docs/adapter_formats.md; C-LoRA: docs/clora.md.
"""
