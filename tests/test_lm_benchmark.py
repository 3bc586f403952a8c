"""The language-model benchmark's --quick path on a 100-token vocabulary: one row of each
teacher signal, the table it writes between the page's markers, the caches' sizes, and a
rerun that resumes (no row trained twice)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from lm_models import WORDS, save_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lm as bench  # noqa: E402

from kdistill.cache import TeacherCache  # noqa: E402


def fortunes(path: Path) -> Path:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS[:20]) for _ in range(rng.randint(6, 14)))
             for _ in range(200)]
    path.write_text("\n%\n".join(texts) + "\n%\n")
    return path


@pytest.mark.slow
def test_the_quick_benchmark_scores_each_signal_and_resumes(tmp_path, monkeypatch):
    args = ["--quick", "--teacher", str(save_llama(tmp_path / "tokenizer")),
            "--texts", str(fortunes(tmp_path / "fortunes")), "--work", str(tmp_path / "work")]
    bench.main(args)
    saved = json.loads((tmp_path / "work" / "lm.json").read_text())
    rows = saved["rows"]
    assert list(rows) == list(bench.QUICK_ROWS)
    assert saved["teacher_pass_s"] > 0 and saved["teacher"]["perplexity"] > 1
    for name, row in rows.items():
        assert row["perplexity"] > 1 and 0 <= row["agreement"] <= 1, name
        uncached = name in ("ce", "ce (pairs)", "seqkd", "gkd")
        assert (row["cache_mb_per_1k"] is None) == uncached, name
    # The completing rows learn from the completions of the same fortunes: fewer tokens.
    assert 0 < rows["gkd"]["labelled_tokens"] == rows["seqkd"]["labelled_tokens"] == rows[
        "ce (pairs)"]["labelled_tokens"] < rows["ce"]["labelled_tokens"]
    speed = saved["speed"]  # one architecture: timed once, against the teacher
    assert speed["student_tok_s"] > 0 and speed["teacher_tok_s"] > 0
    assert speed["speedup"] == pytest.approx(speed["student_tok_s"] / speed["teacher_tok_s"])
    # Per stored token: 100 fp16 logits (dense); 8 fp16 logits, 8 int16 ids and a tail; 32
    # int16 ids, 32 float32 weights and the entropy; headers and the int32 lengths on top.
    assert rows["dense forward_kl"]["cache_mb_per_1k"] > 100 * 2 / 1000
    assert rows["top-8 forward_kl"]["cache_mb_per_1k"] < rows["dense forward_kl"][
        "cache_mb_per_1k"] / 4
    # The top-k caches' tail, against the dense cache's logits: 1 - the k largest
    # probabilities, and the labels outside the k largest logits, over the labelled positions.
    (dense_folder,) = (tmp_path / "work").glob("*/dense")
    dense = TeacherCache.open(dense_folder, verify=False)
    blocks = bench.splits(bench.Settings(**bench.QUICK, texts=args[4]),
                          tmp_path / "work" / "teacher")[0]  # the training split
    columns = blocks.columns()
    logits = dense.read("logits", torch.arange(len(blocks)), columns, torch.device("cpu"))
    labelled = columns["token_mask"].bool()
    for k in (8, 32):
        top = logits.float().softmax(-1).topk(k, dim=-1)
        expected_tail = (1 - top.values.sum(-1))[labelled].mean().item()
        outside = ~(top.indices == columns["labels"].unsqueeze(-1)).any(-1)
        measured = saved["coverage"][f"top-{k}"]
        assert measured["tail_mass"] == pytest.approx(expected_tail, abs=1e-3)
        assert measured["reference_outside"] == pytest.approx(
            outside[labelled].float().mean().item(), abs=1e-6)
    assert saved["coverage"]["top-8"]["tail_mass"] > saved["coverage"]["top-32"]["tail_mass"]
    page = (tmp_path / "work" / "lm.md").read_text()
    assert "What the top-k caches leave in the tail" in page
    assert page.startswith("<!-- results: benchmarks/lm.py -->\n| Student | Signal |")
    assert all(f"| {name} |" in page for name in bench.QUICK_ROWS)

    def trained_again(*_):
        raise AssertionError("a saved row was trained again")

    monkeypatch.setattr(bench.Benchmark, "run_row", trained_again)
    bench.main(args)  # everything saved: nothing to train
    del saved["speed"]
    (tmp_path / "work" / "lm.json").write_text(json.dumps(saved))
    bench.main(args)  # the speed alone is measured again, no row trained
    again = json.loads((tmp_path / "work" / "lm.json").read_text())
    assert again["rows"] == rows and again["speed"]["speedup"] > 0


def test_prompt_pairs_cut_after_the_first_words_at_most_half_and_keep_the_whitespace():
    pairs = bench.prompt_pairs(["one", "a b", "w1 w2 w3 w4\nw5 w6", "x " * 20], words=3)
    assert pairs.texts == ["a", "w1 w2 w3", "x x x"]
    assert pairs.completions == [" b", " w4\nw5 w6", " x" * 17 + " "]
