"""The static sentence-embedding student's training length and learning rate, on the protocol of
``benchmarks/embeddings.py``: does training it longer, shorter or faster bring it to the
targets?

Run on demand (after ``benchmarks/embeddings.py``, whose teacher cache it reads):
``.venv/bin/python benchmarks/static_sweep.py`` writes ``benchmarks/results/static_sweep.json``
(rewritten after every variant; a rerun keeps those saved unless ``--fresh``).

Protocol: ``examples/embeddings/static.yaml`` with ``embedding_kd`` (cosine) as the
``static embedding_kd`` row of ``benchmarks/embeddings.py`` (the same training texts, teacher
cache and seed 0), one override each (:data:`VARIANTS`); scored as that row is, by
:func:`~kdistill.evaluate.task_metrics` (``similarity_spearman`` and ``nn10_overlap`` against the
teacher on the same seeded sample of 2,000 held-out snippets) and by the same linear probe.
No timing: every variant is the same model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from embeddings import fortunes_file, probe, row_config
from resumable import saved_results, write_json

from kdistill.contexts import num_threads
from kdistill.evaluate import eval_batches, predict, task_metrics
from kdistill.models import deployable
from kdistill.run import build_data, build_from, train_run

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "benchmarks" / "results" / "static_sweep.json"
ROW = "static embedding_kd"
VARIANTS = {"3 epochs": ["trainer.epochs=3"], "5 epochs": ["trainer.epochs=5"],
            "20 epochs": ["trainer.epochs=20"], "lr 3e-3": ["trainer.optimizer.lr=0.003"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    results = saved_results(OUTPUT, args.fresh, __doc__, {"variants": {}})
    fortunes, _ = fortunes_file()
    base = row_config(ROW, False, fortunes)
    data = build_data(base.data)
    with num_threads(args.threads):
        teacher = build_from(base.teacher.model, data, 0, "teacher.model")
        reference = predict(teacher, eval_batches(data.test, 64)).logits
        for name in args.variants:
            if name in results["variants"]:
                continue
            started = time.perf_counter()
            _, fit = train_run(row_config(ROW, False, fortunes, VARIANTS[name]), data)
            student = deployable(fit.student)
            metrics = task_metrics(predict(student, eval_batches(data.test, 64)), reference)
            results["variants"][name] = {
                "overrides": VARIANTS[name],
                "similarity_spearman": metrics["similarity_spearman"],
                "nn10_overlap": metrics["nn10_overlap"],
                "probe_accuracy": probe(student, data),
                "seconds": time.perf_counter() - started}
            print(name, results["variants"][name], flush=True)
            write_json(OUTPUT, results)


if __name__ == "__main__":
    main()
