"""The engine: one training loop for every recipe, on Hugging Face Accelerate.

``Distiller(student, teacher, recipe, ...).fit(train, eval)`` trains ``student`` through a list of
phases (each a recipe, a number of epochs and optionally its own optimizer and LR schedule).
Per optimizer step it

1. takes this process's micro-batches of the next global batch (:mod:`kdistill.batching`),
   loaded ahead by the phase's DataLoader (:mod:`kdistill.engine.feed`: workers, prefetch,
   training streams),
2. counts each loss unit (examples, labelled examples, tokens) over the whole global batch,
3. for every micro-batch: teacher taps, student taps, the recipe's terms, and
   ``sum_k w_k * value_k * local_count_k / global_count_k`` backpropagated (gradients are
   synchronised across processes on the last micro-batch only),
4. checks that every term and the gradient norm are finite (a non-finite step applies no
   update and stops the fit with ``NonFiniteError``, or with ``on_nonfinite: skip`` is skipped
   and logged), clips, steps the optimizer and LR schedule, lets the teacher source update
   (EMA), logs a record with every term (its mean over the global batch), their weighted total
   ``loss`` and the learning rate the step used (history and ``<run_dir>/metrics.jsonl``).

Only the student and the recipe's own modules are wrapped for data parallelism; the teacher
runs outside the wrapper on every process. Checkpoints are written every ``checkpoint_every``
steps and at the end of every ``eval_every``-th epoch and of each phase; ``fit(...,
resume=True)`` continues from the newest intact one and ends with the same weights, history and
metrics log as an uninterrupted run. A fit without ``resume`` needs an empty run directory
(``overwrite=True`` replaces an earlier run's, once the new run has started); nothing is written
there before the run has started.
"""

from kdistill.engine.distiller import Distiller, distill
from kdistill.engine.phases import FitResult, Phase, recipe_phases, wrap_student

__all__ = ["Distiller", "FitResult", "Phase", "distill", "recipe_phases", "wrap_student"]
