"""What varies per task, as one record the training loop takes: ``Task``.

A task turns the run's config, the loaded model and the process layout into its data, batches, loss
and held-out metrics; ``recipes/loop.py`` does the rest (stepping, accumulation, logging, eval,
saving, resume, NaN guard, profiling hooks, interrupts). ``build(cfg, model_cfg, params, layout)``
picks the task module by ``--task``:

- ``causal_lm``: next-token loss on supervised data (``data`` formats and templates, packing);
- ``classify`` / ``mlm``: an encoder's (BERT's) sequence classification or masked-LM objective;
- ``dpo``: preference tuning (DPO, IPO, hinge, SimPO, ORPO) on chosen / rejected pairs;
- ``distill``: knowledge distillation of a ``--teacher`` into the trained model.

A task's ``loss(gather, remat)`` returns ``(params, batch) -> (loss sum, count)`` or
``(loss sum, count, sums)``: ``sums`` ({metric: tensor}) are summed like the loss and reported
divided by the count (accuracy, rewards). ``count(batch)`` is the normalizer the step divides the
accumulated loss by (labelled tokens, examples, pairs), known before the forward.
"""

from __future__ import annotations

from typing import Any

from purefine.recipes.tasks import causal_lm, classify, distill, dpo
from purefine.recipes.tasks.base import Task, labelled_tokens

__all__ = ["Task", "build", "labelled_tokens"]

BUILDERS = {"causal_lm": causal_lm.build, "classify": classify.build, "mlm": classify.build, "dpo": dpo.build,
            "distill": distill.build}


def build(cfg: Any, model_cfg: Any, params: Any, layout: Any) -> Task:
    """The task ``cfg.task`` names, built for this model and process layout."""
    return BUILDERS[cfg.task](cfg, model_cfg, params, layout)
