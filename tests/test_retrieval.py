"""Retrieval data, batches, metrics and runs: files of labelled pairs or of queries plus a
collection (relevance then the teacher's top 10), the batch that gathers each query's positive,
hard and in-batch negatives, MRR@10 / recall@k / nDCG@10 / teacher overlap against hand
computation, the evaluation wiring, config runs, a frozen teacher, and distillation beating
the student's own contrastive loss on a fixed seed."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import pytest
import torch
import transformers
from test_hf_text import VOCAB, save_bert

from kdistill.batch import PASSAGE_ROW, POSITIVE, RELEVANCE, UNLABELED, collate
from kdistill.config import ConfigError, parse_config
from kdistill.data import load_dataset
from kdistill.data.retrieval import RetrievalEvalSet, RetrievalPairs
from kdistill.engine import Distiller
from kdistill.evaluate import eval_batches, predict, task_metrics
from kdistill.models import build_model
from kdistill.recipes import build_recipe
from kdistill.retrieval_metrics import ranking_metrics, relevance_matrix, retrieval_metrics
from kdistill.run import rank_by_teacher, run

WORDS = VOCAB[5:]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ------------------------------------------------------------------------------------- data

def test_labelled_pairs_give_each_row_its_passages_and_every_positive_of_its_query(
        tmp_path: Path) -> None:
    rows = [{"q": "cat", "pos": "a cat sat", "negs": ["a dog", "red mat"]},
            {"q": "dog", "pos": "a dog ran", "negs": "a cat sat"},
            {"q": "cat", "pos": "the cat"},
            {"q": "mat", "pos": "red mat", "negs": []}]
    data = load_dataset("retrieval", path=write_jsonl(tmp_path / "p.jsonl", rows),
                        test_path=str(write_jsonl(tmp_path / "t.jsonl", rows[:2])),
                        query_column="q", positive_column="pos", negatives_column="negs")
    assert data.task == "retrieval" and len(data.train) == 4
    assert data.train[0] == {"input": "cat", "passages": ["a cat sat", "a dog", "red mat"],
                             "relevant": ["a cat sat", "the cat"], "index": torch.tensor(0)}
    assert data.train[1]["passages"] == ["a dog ran", "a cat sat"]
    assert data.train[2]["relevant"] == ["a cat sat", "the cat"]
    test = data.test
    assert isinstance(test, RetrievalEvalSet) and not test.teacher_relevance
    assert test.queries == ["cat", "dog"]
    assert test.passages == ["a cat sat", "a dog ran", "a dog", "red mat"]
    assert [test[i]["input"] for i in range(len(test))] == test.queries + test.passages
    assert test[0]["labels"].tolist() == [0] and test[1]["labels"].tolist() == [1]
    assert test[2]["labels"].tolist() == [UNLABELED] and bool(test[2][PASSAGE_ROW])


def test_csv_negatives_are_every_column_starting_with_the_name_and_splits_keep_queries(
        tmp_path: Path) -> None:
    lines = ["query,positive,negatives,negatives_2"] + [
        f"q{i % 5},p{i},n{i},{'' if i % 2 else f'm{i}'}" for i in range(10)]
    path = tmp_path / "pairs.csv"
    path.write_text("\n".join(lines) + "\n")
    data = load_dataset("retrieval", path=path, test_fraction=0.4, seed=3)
    assert data.train[0]["passages"][1:] in (["n0", "m0"], ["n1"], ["n2", "m2"], ["n3"],
                                             ["n4", "m4"])
    train_queries = set(data.train.queries)
    assert train_queries.isdisjoint(data.test.queries)  # a query never on both sides
    assert len(data.test.queries) == 2 and len(train_queries) == 3


def test_unlabelled_queries_wait_for_the_teachers_top_10(tmp_path: Path) -> None:
    (tmp_path / "q.txt").write_text("alpha\nbeta\ngamma\ndelta\n")
    (tmp_path / "p.txt").write_text("\n".join(f"passage {i}" for i in range(16)) + "\n")
    data = load_dataset("retrieval", path=tmp_path / "q.txt", passages=str(tmp_path / "p.txt"),
                        mined_negatives=3, test_fraction=0.25, seed=0)
    train = data.train
    assert isinstance(train, RetrievalPairs) and not train.ranked
    assert train.labels.tolist() == [UNLABELED] * 3 and data.test.teacher_relevance
    with pytest.raises(ValueError, match="no relevance yet: it comes from the teacher's ranking"):
        train[0]
    ranking = torch.stack([torch.arange(13) + i for i in range(3)])
    ranked = train.with_teacher_ranking(ranking)
    assert ranked.teacher_relevance and ranked.labels.tolist() == [0, 0, 0]
    sample = ranked[1]
    assert sample["passages"] == ["passage 1", "passage 11", "passage 12", "passage 13"]
    assert sample["relevant"] == [f"passage {i}" for i in range(1, 11)]
    with pytest.raises(ValueError, match=r"expected a ranking \[3, 13\], got \(3, 12\)"):
        train.with_teacher_ranking(ranking[:, :12])


@pytest.mark.parametrize(("rows", "options", "message"), [
    ('{"query": "a", "positive": "b"}\n{"positive": "c"}\n', {},
     r"p.jsonl, line 2: no field 'query' \(query_column\); fields present: positive"),
    ('{"query": "a", "positive": "b"}\n{"query": "c"}\n', {},
     r"p.jsonl, line 2: no field 'positive' \(positive_column\), which the first row has"),
    ('{"query": "a", "positive": ""}\n', {}, r"p.jsonl, line 1: field 'positive' is empty"),
    ('{"query": "a", "positive": "b", "negatives": [3]}\n', {},
     r"p.jsonl, line 1: field 'negatives' item 0 holds a int, not text"),
    ('{"query": "a"}\n', {},
     r"p.jsonl: unlabelled queries \(no column 'positive', positive_column\) need a passage "
     r"collection to be ranked in; give data.options.passages"),
])
def test_bad_retrieval_files_name_the_file_line_and_field(tmp_path: Path, rows: str,
                                                          options: dict, message: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(rows)
    with pytest.raises(ValueError, match=message):
        load_dataset("retrieval", path=path, **options)


def test_a_collection_too_small_for_the_teachers_ranking_is_refused(tmp_path: Path) -> None:
    (tmp_path / "q.txt").write_text("a\nb\n")
    (tmp_path / "p.tsv").write_text("passage\n" + "\n".join(f"p{i}" for i in range(12)) + "\n")
    with pytest.raises(ValueError, match=r"p.tsv: 12 passages; ranking by the teacher needs at "
                                         r"least 14 \(its top 10 and 4 mined negatives\)"):
        load_dataset("retrieval", path=tmp_path / "q.txt", passages=str(tmp_path / "p.tsv"))
    (tmp_path / "bad.tsv").write_text("text\nx\n")
    with pytest.raises(ValueError, match=r"bad.tsv, line 2: no column 'passage' "
                                         r"\(passage_column\); columns present: text"):
        load_dataset("retrieval", path=tmp_path / "q.txt", passages=str(tmp_path / "bad.tsv"))


# ------------------------------------------------------------------------------------ batches

def test_a_batch_gathers_each_passage_once_with_positives_and_relevance() -> None:
    samples = [{"input": "q0", "passages": ["a", "b", "c"], "relevant": ["a", "d"],
                "index": torch.tensor(4)},
               {"input": "q1", "passages": ["b", "d"], "relevant": ["b"],
                "index": torch.tensor(7)},
               {"input": "q2", "passages": ["d", "a"], "relevant": ["d", "a"],
                "index": torch.tensor(1)}]
    batch = collate(samples)
    assert batch["input"] == ["q0", "q1", "q2", "a", "b", "c", "d"]
    assert batch["index"].tolist() == [4, 7, 1]
    assert batch[POSITIVE].tolist() == [0, 1, 3]
    assert batch[RELEVANCE].tolist() == [[True, False, False, True],
                                         [False, True, False, False],
                                         [True, False, False, True]]


# ------------------------------------------------------------------------------------ metrics

def by_hand(ranked: list[list[int]], relevant: list[set[int]]) -> dict[str, float]:
    mrr, r10, r100, ndcg = [], [], [], []
    for order, rel in zip(ranked, relevant, strict=True):
        if not rel:
            continue
        hits = [p in rel for p in order]
        mrr.append(next((1 / (i + 1) for i, h in enumerate(hits[:10]) if h), 0.0))
        r10.append(sum(hits[:10]) / len(rel))
        r100.append(sum(hits[:100]) / len(rel))
        dcg = sum(1 / math.log2(i + 2) for i, h in enumerate(hits[:10]) if h)
        ideal = sum(1 / math.log2(i + 2) for i in range(min(len(rel), 10)))
        ndcg.append(dcg / ideal)
    return {"mrr10": sum(mrr) / len(mrr), "recall10": sum(r10) / len(r10),
            "recall100": sum(r100) / len(r100), "ndcg10": sum(ndcg) / len(ndcg)}


def test_ranking_metrics_against_hand_computation() -> None:
    generator = torch.Generator().manual_seed(0)
    ranked = torch.stack([torch.randperm(120, generator=generator) for _ in range(6)])
    relevant = [{int(ranked[0, 3])}, {int(ranked[1, 0]), int(ranked[1, 12]), 5},
                {int(ranked[2, 40])}, set(), {int(x) for x in ranked[4, :14]},
                {int(ranked[5, 9]), int(ranked[5, 110])}]
    matrix = torch.zeros(6, 120, dtype=torch.bool)
    for row, passages in enumerate(relevant):
        matrix[row, list(passages)] = True
    got = ranking_metrics(ranked, matrix)
    expected = by_hand(ranked.tolist(), relevant)
    assert got == pytest.approx(expected, rel=1e-12)
    assert relevance_matrix(torch.tensor([[2, UNLABELED], [0, 1]]), 3).tolist() == [
        [False, False, True], [True, True, False]]


def test_retrieval_metrics_rank_by_dot_product_and_compare_with_the_teachers_top_10() -> None:
    queries, passages = torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), \
        torch.randn(30, 3, generator=torch.Generator().manual_seed(2))
    rows = torch.cat([queries, passages])
    flags = torch.tensor([False] * 4 + [True] * 30)
    relevant = torch.full((34, 2), UNLABELED)
    relevant[:4] = torch.tensor([[0, 1], [2, UNLABELED], [3, 4], [29, UNLABELED]])
    teacher = rows + 0.3 * torch.randn(34, 3, generator=torch.Generator().manual_seed(3))
    got = retrieval_metrics(rows, flags, relevant, teacher)
    order = (queries @ passages.T).argsort(dim=1, descending=True).tolist()
    assert {k: got[k] for k in ("mrr10", "recall10", "recall100", "ndcg10")} == pytest.approx(
        by_hand(order, [{0, 1}, {2}, {3, 4}, {29}]))
    t_order = (teacher[:4] @ teacher[4:].T).argsort(dim=1, descending=True)[:, :10].tolist()
    overlap = sum(len(set(a[:10]) & set(b)) for a, b in zip(order, t_order, strict=True)) / 40
    assert got["teacher_overlap10"] == pytest.approx(overlap)
    # Without labels the teacher's top 10 are relevant: its own ranking scores 1, and a
    # model's recall10 is its overlap with the teacher.
    unlabelled = retrieval_metrics(rows, flags, None, teacher)
    assert unlabelled["recall10"] == pytest.approx(overlap)
    assert retrieval_metrics(teacher, flags, None, teacher)["mrr10"] == 1.0
    assert "teacher_overlap10" not in retrieval_metrics(rows, flags, relevant)
    with pytest.raises(ValueError, match="scored against the teacher's top 10, and no teacher"):
        retrieval_metrics(rows, flags, None)


def test_the_evaluation_reads_retrieval_rows_in_data_order() -> None:
    test = RetrievalEvalSet(["q a", "q b"], ["p a", "p b", "p c"], [[1], [0, 2]])

    class Lookup(torch.nn.Module):
        """A sentence encoder answering a fixed vector per text."""
        vectors = {"q a": [1.0, 0.0], "q b": [0.0, 1.0], "p a": [0.2, 0.9],
                   "p b": [0.9, 0.1], "p c": [0.1, 0.5]}

        def forward(self, texts: list[str]) -> dict[str, torch.Tensor]:
            return {"sentence_embedding": torch.tensor([self.vectors[t] for t in texts])}

    predictions = predict(Lookup(), eval_batches(test, batch_size=2))
    assert predictions.task == "retrieval"
    assert predictions.passage.tolist() == [False, False, True, True, True]
    assert predictions.labels.tolist() == [[1, UNLABELED], [0, 2], *[[UNLABELED] * 2] * 3]
    metrics = task_metrics(predictions)
    # q a ranks p b first (relevant): 1; q b ranks p a, p c, p b: both relevant on top.
    assert metrics == pytest.approx({"mrr10": 1.0, "recall10": 1.0, "recall100": 1.0,
                                     "ndcg10": 1.0})


# ------------------------------------------------------------------------------- with models

@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 3-layer teacher and a 2-layer student of another vocabulary (they tokenise
    differently), plus unlabelled queries and a collection of word strings."""
    root = tmp_path_factory.mktemp("retrieval")
    rng = random.Random(0)
    (root / "queries.txt").write_text(
        "\n".join(" ".join(rng.sample(WORDS, 3)) for _ in range(40)) + "\n")
    (root / "passages.txt").write_text(
        "\n".join(" ".join(rng.sample(WORDS, 5)) for _ in range(40)) + "\n")
    return {"teacher": save_bert(root / "teacher", layers=3, seed=1, head=transformers.BertModel),
            "student": save_bert(root / "student", layers=2, seed=2, head=transformers.BertModel,
                                 vocab=[*VOCAB[:5], *reversed(WORDS), "x"]),
            "root": root}


def fit(folders: dict[str, Path], **recipe: object) -> tuple[list[dict], dict, dict]:
    """A distillation of the student on the teacher-ranked queries: the evaluations, and the
    teacher's weights before and after."""
    data = load_dataset("retrieval", path=folders["root"] / "queries.txt",
                        passages=str(folders["root"] / "passages.txt"), test_fraction=0.25)
    teacher = build_model("hf_embedder", (), 0, path=str(folders["teacher"]))
    rank_by_teacher(data, teacher, batch_size=64)
    before = copy.deepcopy(teacher.state_dict())
    torch.manual_seed(0)
    student = build_model("hf_embedder", (), 0, path=str(folders["student"]))
    spec = dict(recipe)
    result = Distiller(student, teacher, build_recipe(spec.pop("name"), **spec), epochs=3,
                       batch_size=8, progress=False, optimizer={"lr": 0.003}).fit(
                           data.train, data.test)
    return [h for h in result.history if h["kind"] == "eval"], before, teacher.state_dict()


LEAD_TINY = {"name": "lead", "student_layers": 2, "teacher_layers": 3, "pairs": 2,
             "pooling": "mean", "similarity": "cosine", "temperature": 0.1}


def test_lead_across_tokenisers_beats_the_students_own_contrastive_loss_and_keeps_the_teacher(
        folders: dict[str, Path]) -> None:
    distilled, before, after = fit(folders, **LEAD_TINY)
    baseline, _, _ = fit(folders, **LEAD_TINY, kd_weight=0.0, layer_weight=0.0)
    assert distilled[-1]["eval_recall10"] > baseline[-1]["eval_recall10"] + 0.03
    assert distilled[-1]["eval_ndcg10"] > baseline[-1]["eval_ndcg10"]
    assert all(torch.equal(before[k], after[k]) for k in before)


DCD_TINY = {"name": "dcd", "negatives": 3, "similarity": "cosine", "temperature": 0.1}


def test_dcds_distillation_term_beats_its_twin_without_it_and_keeps_the_teacher(
        folders: dict[str, Path]) -> None:
    # alpha 0 keeps the teacher's choice of negatives and its weights but drops the MSE
    # between the similarities: the gain is the distillation term's.
    distilled, before, after = fit(folders, **DCD_TINY, alpha=0.5)
    baseline, _, _ = fit(folders, **DCD_TINY, alpha=0.0)
    assert distilled[-1]["eval_recall10"] > baseline[-1]["eval_recall10"] + 0.05
    assert distilled[-1]["eval_ndcg10"] > baseline[-1]["eval_ndcg10"] + 0.03
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_config_run_ranks_unlabelled_queries_by_the_teacher_and_says_so(
        folders: dict[str, Path], tmp_path: Path) -> None:
    config = parse_config({
        "name": "ret", "output_dir": str(tmp_path / "runs"),
        "data": {"name": "retrieval", "path": str(folders["root"] / "queries.txt"),
                 "options": {"passages": str(folders["root"] / "passages.txt")}},
        "teacher": {"model": {"name": "hf_embedder", "options": {"path": str(folders["teacher"])}}},
        "student": {"name": "hf_embedder", "options": {"path": str(folders["student"])}},
        "recipe": {"name": "dcd", "negatives": 3, "similarity": "cosine", "temperature": 0.1},
        "trainer": {"epochs": 1, "batch_size": 8, "progress": False},
        "evaluation": {"repeats": 1}})
    outcome = run(config)
    rows = {row["name"]: row for row in outcome.rows}
    assert rows["teacher"]["mrr10"] == 1.0 and rows["teacher"]["teacher_overlap10"] == 1.0
    assert rows["student"]["recall10"] == pytest.approx(rows["student"]["teacher_overlap10"])
    report = (tmp_path / "runs" / "ret" / "report.md").read_text()
    assert "| MRR@10 | R@10 | R@100 | nDCG@10 | Top-10/teacher |" in report
    assert "Retrieval relevance: no labels; each query's relevant passages are the teacher's " \
           "own top 10" in report


def test_configs_refuse_a_missing_collection_and_classification_recipes(
        folders: dict[str, Path], tmp_path: Path) -> None:
    raw = {"name": "ret", "output_dir": str(tmp_path / "runs"),
           "data": {"name": "retrieval", "path": str(folders["root"] / "queries.txt"),
                    "options": {"passages": str(tmp_path / "none.txt")}},
           "teacher": {"model": {"name": "hf_embedder",
                                 "options": {"path": str(folders["teacher"])}}},
           "student": {"name": "hf_embedder", "options": {"path": str(folders["student"])}},
           "recipe": {"name": "dcd"}}
    with pytest.raises(ConfigError, match=r"data.options.passages: file not found: .*none.txt"):
        parse_config(raw)
    raw["data"]["options"]["passages"] = str(folders["root"] / "passages.txt")
    raw["recipe"] = {"name": "ckd"}
    with pytest.raises(ConfigError, match=r"recipe: 'ckd' is a embedding recipe but data set "
                                          r"'queries' is a retrieval task; recipes for it: "
                                          r"\['dcd', 'lead'\]"):
        run(parse_config(raw))


@pytest.mark.usefixtures("minilm")
def test_the_retrieval_examples_are_valid_where_their_model_is_installed() -> None:
    from kdistill.config import load_config
    examples = Path(__file__).resolve().parents[1] / "examples" / "retrieval"
    configs = {path.stem: load_config(path) for path in sorted(examples.glob("*.yaml"))}
    assert {name: c.recipe["name"] for name, c in configs.items()} == {"dcd": "dcd",
                                                                      "lead": "lead"}
    assert all(c.data.name == "rotten-tomatoes-plots" for c in configs.values())
