"""MSD (``msd``): the channel model against a hand computation of each channel, the multi-kernel
MMD against a loop over pairs, the teacher's and the student's terms against their equations
(non-default weights, kernels and multiplier) on a padded batch mixing labelled source and
unlabelled target sentences, the domain marker, the frozen teacher, the deployable student and
the errors. Tiny BERT taggers (a 4-layer teacher of width 32, a 3-layer student of width 16)
and their word-piece tokenizer are built here."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from pydantic import ValidationError
from torch import Tensor

from kdistill import losses
from kdistill.batch import UNLABELED, collate
from kdistill.engine import Distiller
from kdistill.models import deployable
from kdistill.models.channels import ChannelModel, default_channel_layers
from kdistill.models.hf_text import build_hf_text
from kdistill.models.text import TextModel
from kdistill.recipes import build_recipe
from kdistill.recipes.msd import MSD, target_rows
from kdistill.schedules import TrainState
from kdistill.taps import TapReader, Taps

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat",
         "play", "##ing", "##ed", "dog", "a", "big", "red", "ran", "to", "it"]
SENTENCES = [["the", "cat", "sat"], ["a", "dog", "ran", "to", "it"], ["playing"],
             ["the", "big", "red", "dog"], ["it", "played"], ["a", "mat"]]
# Sentences 0, 1 and 3 are labelled (source), 2, 4 and 5 are not (target); sentence 1 has a
# word without a label and still counts as source.
TAGS = [[0, 1, 2], [1, UNLABELED, 0, 2, 1], None, [2, 0, 1, 1], None, None]
SETTINGS = {"cpu": True, "progress": False, "batch_size": 6}
STATE = TrainState()


def save_tagger(folder: Path, layers: int, hidden: int, seed: int) -> str:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=2, intermediate_size=24, max_position_embeddings=32, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.3)
    transformers.BertForTokenClassification(config).save_pretrained(folder)
    transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(VOCAB)}).save_pretrained(
        folder)
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("msd")
    return {"teacher": save_tagger(root / "teacher", layers=4, hidden=32, seed=0),
            "student": save_tagger(root / "student", layers=3, hidden=16, seed=1)}


def tagger(folders: dict[str, str], role: str) -> TextModel:
    return build_hf_text((), 3, folders[role], task="token_classification")


def samples() -> list[dict[str, Any]]:
    return [{"input": words, "index": torch.tensor(i),
             "labels": torch.tensor(tags if tags is not None else [UNLABELED] * len(words))}
            for i, (words, tags) in enumerate(zip(SENTENCES, TAGS, strict=True))]


def read(model: torch.nn.Module, batch: dict[str, Any]) -> Taps:
    model.eval()
    with TapReader(model, ["heads", "hidden.-1"]) as reader, torch.no_grad():
        return reader(batch)


def channel_teacher(folders: dict[str, str]) -> ChannelModel:
    torch.manual_seed(5)
    teacher = MSD(stage="teacher", channel_layers=[2, 3], dropout=0.0).wrap_student(
        tagger(folders, "teacher"))
    assert isinstance(teacher, ChannelModel)
    return teacher


# -- independent computations -------------------------------------------------------------------
def mmd_by_hand(x: Tensor, y: Tensor, kernels: int, multiplier: float) -> float:
    """The biased multi-kernel MMD^2 by loops over pairs, in float64."""
    z = [row.double() for row in torch.cat([x, y])]
    n, total = len(x), len(z)
    d = [[float(((a - b) ** 2).sum()) for b in z] for a in z]
    base = sum(map(sum, d)) / (total * total - total) / multiplier ** (kernels // 2)
    k = [[sum(math.exp(-d[i][j] / (base * multiplier**m)) for m in range(kernels))
          for j in range(total)] for i in range(total)]

    def block(rows: range, cols: range) -> float:
        return sum(k[i][j] for i in rows for j in cols) / (len(rows) * len(cols))

    xs, ys = range(n), range(n, total)
    return block(xs, xs) + block(ys, ys) - block(xs, ys) - block(ys, xs)


def ce_by_hand(logits: Tensor, labels: Tensor) -> float:
    """Mean over known word labels of -log softmax(z)_y."""
    values = [-float(torch.log_softmax(logits[b, w].double(), -1)[labels[b, w]])
              for b in range(labels.shape[0]) for w in range(labels.shape[1])
              if labels[b, w] != UNLABELED]
    return sum(values) / len(values)


def prob_mse_by_hand(z_s: Tensor, z_t: Tensor, mask: Tensor) -> float:
    """Mean over valid words x classes of (p_s - p_t)^2."""
    total, count = 0.0, 0
    for b, w in mask.nonzero().tolist():
        p_s, p_t = z_s[b, w].double().softmax(-1), z_t[b, w].double().softmax(-1)
        total += float(((p_s - p_t) ** 2).sum())
        count += z_s.shape[-1]
    return total / count


def softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


# -- the channel model --------------------------------------------------------------------------
def test_default_channels_are_msds_layers_4_to_11_of_12() -> None:
    assert default_channel_layers(12) == list(range(4, 12))
    assert default_channel_layers(3) == [1, 2]
    assert default_channel_layers(4) == [1, 2, 3]


def test_each_channel_is_a_linear_classifier_of_its_hidden_state_at_each_word_start(
        folders: dict[str, str]) -> None:
    model = channel_teacher(folders)
    batch = collate(samples())
    out = model(batch["input"])
    inner = model.model(batch["input"], output_hidden_states=True)
    heads = out["heads"]
    assert heads.shape == (3, 6, 5, 3)
    torch.testing.assert_close(heads[0], inner["logits"])
    torch.testing.assert_close(out["logits"], inner["logits"])
    starts = inner["word_starts"]
    for k, layer in enumerate([2, 3]):
        linear = model.channels[k]
        for b in range(6):
            for w in range(len(SENTENCES[b])):
                h = inner["hidden_states"][layer][b, starts[b, w]]
                torch.testing.assert_close(heads[1 + k, b, w], h @ linear.weight.T + linear.bias)
    # "playing" is two word pieces: its row is read at its first one (position 1 after [CLS]).
    assert starts[2, 0] == 1 and starts[1].tolist() == [1, 2, 3, 4, 5]


def test_the_deployed_student_is_the_tagger_without_its_channels(
        folders: dict[str, str]) -> None:
    model = channel_teacher(folders)
    shipped = deployable(model)
    assert shipped is model.model and isinstance(shipped, TextModel)
    batch = collate(samples())
    torch.testing.assert_close(shipped(batch["input"])["logits"], model(batch["input"])["logits"])
    assert not any("channels" in name for name in shipped.state_dict())


# -- MMD ------------------------------------------------------------------------------------------
def test_mmd_rbf_matches_a_loop_over_pairs_with_other_kernels_and_multiplier() -> None:
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 5, generator=gen), torch.randn(3, 5, generator=gen) + 0.7
    got = float(losses.mmd_rbf(x, y, kernels=3, multiplier=1.5))
    assert got == pytest.approx(mmd_by_hand(x, y, 3, 1.5), rel=1e-5)
    assert float(losses.mmd_rbf(x, y)) == pytest.approx(mmd_by_hand(x, y, 5, 2.0), rel=1e-5)
    assert float(losses.mmd_rbf(x, x.clone())) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"mmd_rbf: both feature sets need a row, got 4 "
                                         r"source and 0 target rows"):
        losses.mmd_rbf(x, y[:0])


# -- the domain marker -------------------------------------------------------------------------
def test_a_sample_is_target_when_none_of_its_words_has_a_label_unless_marked() -> None:
    batch = collate(samples())
    assert target_rows(batch, 6).tolist() == [False, False, True, False, True, True]
    batch["domain"] = torch.tensor([1, 0, 0, 0, 1, 0])
    assert target_rows(batch, 6).tolist() == [True, False, False, False, True, False]
    batch["domain"] = torch.tensor([1, 0, 2, 0, 1, 0])
    with pytest.raises(ValueError, match=r"msd: batch\['domain'\] must hold 0 \(source\) or 1 "
                                         r"\(target\) per sample \(6 samples\), got "
                                         r"\[1, 0, 2, 0, 1, 0\]"):
        target_rows(batch, 6)


# -- terms --------------------------------------------------------------------------------------
def test_teacher_terms_follow_the_equation(folders: dict[str, str]) -> None:
    recipe = MSD(stage="teacher", channel_layers=[2, 3], channel_weight=0.3, mmd_weight=0.2,
                 kernels=3, kernel_multiplier=3.0, dropout=0.0)
    model = channel_teacher(folders)
    batch = collate(samples())
    taps = read(model, batch)
    recipe.build(taps, None)
    assert not recipe.uses_teacher and recipe.teacher_taps() == []
    terms = recipe.terms(taps, None, batch, STATE)
    heads, labels = taps["heads"], batch["labels"]
    a = softmax(recipe.omega.tolist())
    channels = sum(a[k] * ce_by_hand(heads[1 + k], labels) for k in range(2))
    cls = taps["hidden.-1"][:, 0]
    mmd = mmd_by_hand(cls[[0, 1, 3]], cls[[2, 4, 5]], 3, 3.0)
    expected = {"ce": (ce_by_hand(heads[0], labels), 1.0, "labeled"),
                "channels": (channels, 0.3, "labeled"), "mmd": (mmd, 0.2, "examples")}
    assert set(terms) == set(expected)
    for name, (value, weight, unit) in expected.items():
        assert float(terms[name].value.detach()) == pytest.approx(value, rel=1e-5), name
        assert (terms[name].weight, terms[name].unit) == (weight, unit), name
    # The paper's weights by default: w = 0.1, lambda = 1/20 for the teacher.
    default = MSD(stage="teacher")
    assert (default.params.channel_weight, default.mmd_weight) == (0.1, 1 / 20)


def test_student_terms_follow_the_equation(folders: dict[str, str]) -> None:
    teacher = channel_teacher(folders)
    torch.manual_seed(6)
    recipe = MSD(channel_weight=0.4, mmd_weight=0.5, kernels=2, kernel_multiplier=1.5,
                 dropout=0.0)
    student = recipe.wrap_student(tagger(folders, "student"))
    assert isinstance(student, ChannelModel) and student.layers == [1, 2]
    batch = collate(samples())
    s_taps, t_taps = read(student, batch), read(teacher, batch)
    recipe.build(s_taps, t_taps)
    terms = recipe.terms(s_taps, t_taps, batch, STATE)
    z_s, z_t, mask = s_taps["heads"], t_taps["heads"], batch["attention_mask"]
    a = softmax(recipe.omega.tolist())
    channels = sum(a[k] * prob_mse_by_hand(z_s[1 + k], z_t[1 + k], mask) for k in range(2))
    projection = recipe.projection
    assert isinstance(projection, torch.nn.Linear) and projection.weight.shape == (32, 16)
    with torch.no_grad():
        own = s_taps["hidden.-1"][:, 0] @ projection.weight.T + projection.bias
    source = t_taps["hidden.-1"][:, 0][[0, 1, 3]]
    mmd = (mmd_by_hand(source, own[[2, 4, 5]], 2, 1.5)
           + mmd_by_hand(source, own[[0, 1, 3]], 2, 1.5))
    expected = {"final": (prob_mse_by_hand(z_s[0], z_t[0], mask), 1.0, "tokens"),
                "channels": (channels, 0.4, "tokens"), "mmd": (mmd, 0.5, "examples")}
    assert set(terms) == set(expected)
    for name, (value, weight, unit) in expected.items():
        assert float(terms[name].value.detach()) == pytest.approx(value, rel=1e-5), name
        assert (terms[name].weight, terms[name].unit) == (weight, unit), name
    assert MSD().mmd_weight == 1 / 1000


def test_an_mmd_term_is_zero_in_a_micro_batch_from_one_domain(folders: dict[str, str]) -> None:
    recipe = MSD(stage="teacher", channel_layers=[2, 3])
    model = channel_teacher(folders)
    batch = collate([s for s in samples() if s["labels"].ne(UNLABELED).any()])
    taps = read(model, batch)
    recipe.build(taps, None)
    assert float(recipe.terms(taps, None, batch, STATE)["mmd"].value) == 0.0


# -- training -----------------------------------------------------------------------------------
def test_teacher_stage_then_student_stage_the_teacher_never_changes(
        folders: dict[str, str]) -> None:
    data = samples()
    teacher_fit = Distiller(tagger(folders, "teacher"), None,
                            MSD(stage="teacher", channel_layers=[2, 3]), epochs=2, **SETTINGS)
    teacher = teacher_fit.fit(data).student
    assert isinstance(teacher, ChannelModel) and teacher.layers == [2, 3]
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    distiller = Distiller(tagger(folders, "student"), teacher, MSD(), epochs=2, **SETTINGS)
    student = distiller.student
    before = {k: v.clone() for k, v in student.state_dict().items()}
    result = distiller.fit(data)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, frozen[key]), key
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("channels.") for k in changed)
    assert any(k.startswith("model.") for k in changed)
    assert isinstance(deployable(result.student), TextModel)


# -- errors -------------------------------------------------------------------------------------
def test_a_teacher_without_channels_is_refused(folders: dict[str, str]) -> None:
    with pytest.raises(ValueError, match=r"msd: the teacher \(TextModel\) has no channels; "
                                         r"train it with recipe msd at stage 'teacher'"):
        Distiller(tagger(folders, "student"), tagger(folders, "teacher"), MSD(), **SETTINGS)


def test_student_and_teacher_need_as_many_channels(folders: dict[str, str]) -> None:
    with pytest.raises(ValueError, match=r"msd: channel_layers gives the student 1 channels "
                                         r"\(layers \[2\]\) but the teacher has 2 \(layers "
                                         r"\[2, 3\]\); give channel_layers 2 student layers"):
        Distiller(tagger(folders, "student"), channel_teacher(folders),
                  MSD(channel_layers=[2]), **SETTINGS)


def test_channel_layers_outside_the_model_are_refused(folders: dict[str, str]) -> None:
    with pytest.raises(ValueError, match=r"msd: channel_layers: channel_layers \[1, 3\] must "
                                         r"be distinct hidden states 1-2 of the 3-layer model"):
        MSD(channel_layers=[1, 3]).wrap_student(tagger(folders, "student"))
    with pytest.raises(ValueError, match=r"msd: TinyNet is not a text model of a "
                                         r"transformers network"):
        MSD().wrap_student(TinyNet())


class TinyNet(torch.nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x


def test_sentence_classification_data_is_refused(folders: dict[str, str]) -> None:
    model = channel_teacher(folders)
    with pytest.raises(ValueError, match=r"channels: the model gave no word positions; "
                                         r"channels classify tokens"):
        model(["the cat sat"])


@pytest.mark.parametrize(("field", "value"), [("channel_weight", -0.1), ("kernels", 0),
                                              ("kernel_multiplier", 1.0), ("stage", "tutor"),
                                              ("dropout", 1.0)])
def test_bad_parameters_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValidationError, match=field):
        build_recipe("msd", **{field: value})


def test_teacher_stage_is_the_teachers_recipe() -> None:
    assert MSD.teacher_recipe == ("msd", {"stage": "teacher"})
    assert not MSD(stage="teacher").uses_teacher and MSD().uses_teacher


# -- a config run -------------------------------------------------------------------------------
def write_conll(path: Path, sentences: list[list[str]], tags: list[list[int]]) -> str:
    names = ["O", "PER", "LOC"]
    path.write_text("\n\n".join("\n".join(f"{w} {names[t]}" for w, t in zip(s, ts, strict=True))
                                for s, ts in zip(sentences, tags, strict=True)) + "\n")
    return str(path)


def test_a_config_run_trains_the_teacher_with_channels_and_caches_them(
        folders: dict[str, str], tmp_path: Path) -> None:
    from kdistill.config import parse_config
    from kdistill.run import build_data, obtain_teacher, train_run

    labelled = [SENTENCES[i] for i in (0, 1, 3)] * 3
    tags = [[0, 1, 2], [1, 0, 0, 2, 1], [2, 0, 1, 1]] * 3
    (tmp_path / "raw.txt").write_text("playing\nit played\na mat\n")
    model = {"name": "hf_text", "options": {"path": folders["teacher"]}}
    config = parse_config({
        "name": "msd", "output_dir": str(tmp_path / "runs"),
        "data": {"name": "conll", "path": write_conll(tmp_path / "train.txt", labelled, tags),
                 "options": {"test_path": write_conll(tmp_path / "test.txt", labelled[:3],
                                                      tags[:3])},
                 "unlabeled": str(tmp_path / "raw.txt")},
        "teacher": {"model": model, "train": {"epochs": 1, "batch_size": 4, "progress": False,
                                              "cpu": True}},
        "student": model,  # the paper's setting: the student has the teacher's architecture
        "recipe": {"name": "msd"},
        "trainer": {"epochs": 1, "batch_size": 4, "progress": False, "cpu": True}})
    data = build_data(config.data)
    teacher, fit = train_run(config, data)
    assert isinstance(teacher, ChannelModel) and teacher.layers == [1, 2, 3]
    assert isinstance(deployable(fit.student), TextModel)
    # The cached teacher comes back with the channels it trained.
    again, origin = obtain_teacher(config.teacher, config.data, data, progress=False,
                                   recipe={"name": "msd", "stage": "teacher"})
    assert origin["cached"] is True and isinstance(again, ChannelModel)
    for key, value in teacher.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_a_model_with_channels_is_kept_when_they_are_the_ones_asked_for(
        folders: dict[str, str]) -> None:
    wrapped = MSD(channel_layers=[1, 2], dropout=0.0).wrap_student(tagger(folders, "student"))
    assert MSD(channel_layers=[1, 2]).wrap_student(wrapped) is wrapped
    assert MSD().wrap_student(wrapped) is wrapped
    with pytest.raises(ValueError, match=r"^msd: channel_layers is \[2\] but the model already "
                                         r"has channels on layers \[1, 2\]$"):
        MSD(channel_layers=[2]).wrap_student(wrapped)
    with pytest.raises(RuntimeError, match="^msd: build\\(\\) creates omega on the first batch$"):
        MSD().mixture()
