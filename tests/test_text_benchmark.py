"""The text benchmark's protocol pieces that need no real model: the configs it trains and
the page it rewrites."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import text_sentiment as ts  # noqa: E402
from pages import publish_results, results_markers, with_results, write_results  # noqa: E402


def test_the_results_replace_only_the_text_between_the_markers(tmp_path: Path) -> None:
    start, end = results_markers("text_sentiment.py")
    assert start == "<!-- results: benchmarks/text_sentiment.py -->"
    page = f"# Text\n\nwritten by hand\n\n{start}\nold table\n{end}\n\n## What it says\nmore\n"
    assert with_results(page, "new table\n", "text_sentiment.py") == (
        f"# Text\n\nwritten by hand\n\n{start}\nnew table\n{end}\n\n## What it says\nmore\n")
    assert with_results("", "table\n", "text_sentiment.py") == f"{start}\ntable\n{end}\n"
    other = results_markers("other.py")[0]  # another script's results go after the page
    assert with_results(page, "x\n", "other.py") == f"{page}{other}\nx\n{end}\n"
    both = f"{other}\nx\n{end}\n\n{page}"  # another script's section comes first
    assert with_results(both, "new table\n", "text_sentiment.py") == (
        f"{other}\nx\n{end}\n\n# Text\n\nwritten by hand\n\n{start}\nnew table\n{end}\n\n"
        "## What it says\nmore\n")
    path = tmp_path / "page.md"
    write_results(path, "first\n", "a.py")
    write_results(path, "second\n", "a.py")
    assert path.read_text() == f"{results_markers('a.py')[0]}\nsecond\n{end}\n"


@pytest.mark.usefixtures("minilm")
def test_each_variant_changes_only_the_recipe_the_transfer_set_and_the_seed() -> None:
    hinton = ts.variant_config("ngram", "hinton", 2, quick=False)
    ce = ts.variant_config("ngram", "ce", 2, quick=False)
    augmented = ts.variant_config("ngram", "hinton+aug", 2, quick=False)
    assert hinton.recipe["name"] == "hinton" and ce.recipe == {"name": "ce"}
    assert hinton.trainer.seed == ce.trainer.seed == 2
    assert hinton.data.augment is None and augmented.data.augment.copies == ts.AUGMENT["copies"]
    assert augmented.recipe == hinton.recipe and augmented.student == hinton.student
    assert ce.teacher.cache is None  # nothing to cache for labels alone
    assert hinton.teacher.cache.path != augmented.teacher.cache.path  # one per transfer set
    assert hinton.teacher.model_copy(update={"cache": None}) == ce.teacher
    assert augmented.trainer.epochs == 1  # 5 epochs / (4 copies + 1): the same steps


def test_a_training_subset_is_a_seeded_sample_of_the_training_split_alone() -> None:
    import torch

    from kdistill.data import DataSplits
    from kdistill.data.text import TextDataset

    def texts(prefix: str, count: int) -> TextDataset:
        return TextDataset([f"{prefix}{i}" for i in range(count)], torch.arange(count) % 2)

    data = DataSplits("t", texts("train", 10), texts("test", 4), num_classes=2, input_shape=())
    assert ts.training_subset(data, None) is data
    subset = ts.training_subset(data, 4)
    expected = sorted(torch.randperm(10, generator=torch.Generator().manual_seed(0))[:4].tolist())
    assert subset.train.raw == [f"train{i}" for i in expected]
    assert subset.train.labels.tolist() == [i % 2 for i in expected]
    assert subset.test is data.test and ts.training_subset(data, 4).train.raw == subset.train.raw
    with pytest.raises(SystemExit, match="--train-texts: 11 asked for, the training split has "
                                         "10"):
        ts.training_subset(data, 11)


def test_published_results_go_to_the_docs_page_or_beside_a_smoke_runs_json(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    page, quick = tmp_path / "docs.md", tmp_path / "runs" / "quick.json"
    quick.parent.mkdir()
    start, end = results_markers("b.py")
    publish_results("full\n", page, None, "b.py")
    publish_results("smoke\n", page, quick, "b.py")
    assert page.read_text() == f"{start}\nfull\n{end}\n"
    assert quick.with_suffix(".md").read_text() == f"{start}\nsmoke\n{end}\n"
    assert capsys.readouterr().out == "full\n\nsmoke\n\n"
