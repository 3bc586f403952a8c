"""Every recipe error a user can meet, with its exact message.

A message names the recipe (or helper), the parameter or tap at fault and the values it got, so
the table below pins each one word for word: a message that loses its context, names the wrong
dimension or stops being raised fails here. Each case is a call on tiny hand-made tensors.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch

from kdistill.recipes import build_recipe
from kdistill.recipes.adapters import make_adapter
from kdistill.recipes.adversarial_training import Adversarial
from kdistill.recipes.atsen import ATSEN, pseudo_labels
from kdistill.recipes.base import get_recipe
from kdistill.recipes.bdkd import BDKD, bdkd_terms
from kdistill.recipes.deit import DeiT
from kdistill.recipes.denoise import Denoise
from kdistill.recipes.mutual import DeepMutualLearning, mutual_terms
from kdistill.recipes.okdhp import BranchGate
from kdistill.recipes.regression import GoldMSE, RegressionKD, gold_mse, scores
from kdistill.recipes.shared import anneal_factor, stack_views
from kdistill.schedules import TrainState
from kdistill.taps import Taps

STATE = TrainState()
Z = torch.zeros(4, 3)
TOKENS = torch.zeros(2, 3, 4)
LABELS = torch.tensor([0, 1, 2, 0])


def logits(z: torch.Tensor, *members: Taps) -> Taps:
    return Taps({"logits": z}, members=members)


CASES: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    # ---------------------------------------------------------------- registry and adapters
    ("unknown recipe", lambda: get_recipe("hintn"), ValueError,
     "unknown recipe 'hintn'; did you mean 'hinton' or 'fitnets'?"),
    ("adapter none, default where",
     lambda: make_adapter("none", torch.zeros(2, 3), torch.zeros(2, 4)), ValueError,
     "adapter: adapter 'none' needs equal shapes, student (2, 3) vs teacher (2, 4); use "
     "adapter 'linear' or 'conv1x1'"),
    ("adapter linear, leading dims differ",
     lambda: make_adapter("linear", torch.zeros(2, 3, 4), torch.zeros(2, 5, 6), where="hint"),
     ValueError, "hint: adapter 'linear' maps the last dimension only; student (2, 3, 4) and "
                 "teacher (2, 5, 6) differ elsewhere"),
    ("adapter conv1x1, spatial sizes differ",
     lambda: make_adapter("conv1x1", torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 3, 3)),
     ValueError, "adapter: adapter 'conv1x1' needs [B, C, H, W] maps of equal H, W; student "
                 "(2, 3, 4, 4), teacher (2, 5, 3, 3)"),
    ("adapter conv1x1, not maps",
     lambda: make_adapter("conv1x1", torch.zeros(2, 3), torch.zeros(2, 5, 3, 3)),
     ValueError, "adapter: adapter 'conv1x1' needs [B, C, H, W] maps of equal H, W; student "
                 "(2, 3), teacher (2, 5, 3, 3)"),
    ("adapter kind unknown, close",
     lambda: make_adapter("conv", Z, Z, where="term 'hint'"), ValueError,
     "term 'hint': unknown adapter 'conv'; did you mean 'conv1x1' or 'none'?"),
    ("adapter kind unknown, far", lambda: make_adapter("bogus", Z, Z), ValueError,
     "adapter: unknown adapter 'bogus'; valid names: conv1x1, linear, none"),
    # ---------------------------------------------------------------------------- shared
    ("stack_views without views", lambda: stack_views({}), ValueError,
     "stack_views: needs at least one view"),
    ("stack_views, unlabeled names a missing view",
     lambda: stack_views({0: {"labels": LABELS}, 1: {"labels": LABELS}}, unlabeled=(1, 3, 2)),
     ValueError, "stack_views: unlabeled names views [2, 3] that are not among the views [0, 1]"),
    ("stack_views, no per-sample tensor",
     lambda: stack_views({0: {"other": torch.zeros(2), "labels": torch.tensor(1)}}), ValueError,
     "cannot tell how many samples the batch holds: it has none of ['index', 'labels', "
     "'input', 'input_ids']; keys: ['labels', 'other']"),
    ("anneal_factor epochs", lambda: anneal_factor(0, 0, 3), ValueError,
     "anneal_factor: epochs must be >= 1, got 0"),
    ("anneal_factor t_max", lambda: anneal_factor(0, 3, 0), ValueError,
     "anneal_factor: t_max must be >= 1, got 0"),
    ("anneal_factor epoch", lambda: anneal_factor(-1, 3, 2), ValueError,
     "anneal_factor: epoch must be >= 0, got -1"),
    # ----------------------------------------------------------------------- head recipes
    ("deit heads", lambda: DeiT().terms(Taps({"heads": torch.zeros(3, 4, 5)}),
                                        logits(torch.zeros(4, 5)), {"labels": LABELS}, STATE),
     ValueError, "deit: tap 'heads' must stack 2 heads (class, distillation), got shape "
                 "(3, 4, 5)"),
    ("okdhp gate branches", lambda: BranchGate(6, 2, 5)(torch.zeros(4, 6), torch.zeros(3, 4, 5)),
     ValueError, "okdhp: the aggregation unit was built for 2 branches on features [..., 6]; "
                 "got heads (3, 4, 5) and trunk features (4, 6) (they need the same leading "
                 "shape)"),
    ("okdhp gate features", lambda: BranchGate(6, 2, 5)(torch.zeros(4, 7), torch.zeros(2, 4, 5)),
     ValueError, "okdhp: the aggregation unit was built for 2 branches on features [..., 6]; "
                 "got heads (2, 4, 5) and trunk features (4, 7) (they need the same leading "
                 "shape)"),
    # -------------------------------------------------------------------- phased recipes
    ("annealing one epoch", lambda: build_recipe("annealing").phases(1), ValueError,
     "annealing needs at least 2 epochs: one annealing phase and one cross-entropy phase"),
    ("fitnets one epoch", lambda: build_recipe("fitnets").phases(1), ValueError,
     "fitnets needs at least 2 epochs: one hint phase and one KD phase"),
    # -------------------------------------------------------------------- online recipes
    ("bdkd without teacher", lambda: BDKD().teacher_source(torch.nn.Linear(2, 2), None),
     ValueError, "bdkd needs a teacher model (a larger network that trains with the student); "
                 "give one, or 'teacher.model' in a config"),
    ("bdkd token logits", lambda: bdkd_terms(TOKENS, TOKENS, torch.zeros(2, 3)), ValueError,
     "bdkd: logits have shape (2, 3, 4); expected [batch, classes] (per-token logits are not "
     "supported)"),
    ("dml token logits", lambda: mutual_terms([Z, TOKENS], LABELS), ValueError,
     "dml: peer 1's logits have shape (2, 3, 4); expected [batch, classes] (per-token logits "
     "are not supported)"),
    ("dml without teacher source",
     lambda: DeepMutualLearning().terms(logits(Z), None, {"labels": LABELS}, STATE), ValueError,
     "dml: peers=2 needs 1 trainable peer model(s) from the teacher source, got 0 (use a "
     "PeerTeacher, see teacher_source)"),
    ("atsen without peer", lambda: ATSEN().teacher_source(torch.nn.Linear(2, 2), None),
     ValueError, "atsen needs a peer model (the config's teacher.model, of another "
                 "architecture than the student) to train as its second student"),
    ("atsen without teacher source",
     lambda: ATSEN().terms(logits(Z), None, {"labels": LABELS}, STATE), ValueError,
     "atsen: the teacher source must be the SourceGroup of ATSEN.teacher_source (teacher A, "
     "peer student B, teacher B)"),
    ("atsen with two members",
     lambda: ATSEN().terms(logits(Z), logits(Z, logits(Z), logits(Z)), {"labels": LABELS},
                           STATE), ValueError,
     "atsen: the teacher source must be the SourceGroup of ATSEN.teacher_source (teacher A, "
     "peer student B, teacher B)"),
    ("atsen pseudo-label mask",
     lambda: pseudo_labels(TOKENS, TOKENS, torch.ones(2, 2, dtype=torch.bool)), ValueError,
     "pseudo_labels: valid mask (2, 2) does not match the logits' leading shape (2, 3)"),
    # ------------------------------------------------------------ batch-preparing recipes
    ("denoise without input", lambda: Denoise().augment({"labels": LABELS}), ValueError,
     "denoise: augmentation 'noise' needs batch['input']; batch keys: ['labels']"),
    ("denoise image without input",
     lambda: Denoise(augmentation="image").augment({"labels": LABELS, "input": [1, 2]}),
     ValueError, "denoise: augmentation 'image' needs batch['input']; batch keys: ['input', "
                 "'labels']"),
    ("adversarial without tap reader",
     lambda: Adversarial().prepare({"input": torch.rand(2, 3), "labels": LABELS[:2]},
                                   lambda batch: logits(batch["input"]), STATE), TypeError,
     "adversarial: prepare() needs the student's tap reader (with its model as .model), got "
     "function"),
    # ---------------------------------------------------------------------- regression
    ("scores of token logits", lambda: scores(TOKENS, "student"), ValueError,
     "the student's logits must hold one score per sample ([N] or [N, 1]), got shape "
     "(2, 3, 4)"),
    ("mse on a classifier",
     lambda: GoldMSE().terms(logits(Z), None, {"labels": torch.zeros(4)}, STATE), ValueError,
     "the model's logits must hold one score per sample ([N] or [N, 1]), got shape (4, 3): a "
     "classifier with 3 classes cannot be regressed on"),
    ("gold scores of another size",
     lambda: gold_mse(torch.zeros(4), torch.zeros(3), torch.ones(4, dtype=torch.bool)),
     ValueError, "labels of shape (3,) do not match the model's (4,) scores"),
    ("regression_kd without input",
     lambda: RegressionKD().prepare({"input_ids": torch.zeros(2, 3), "labels": torch.zeros(2)},
                                    logits, STATE), ValueError,
     "regression_kd: needs batch['input'] tensors to augment; batch keys: ['input_ids', "
     "'labels']"),
    ("regression_kd token inputs",
     lambda: RegressionKD().prepare({"input": torch.zeros(2, 3, dtype=torch.long),
                                     "labels": torch.zeros(2)}, logits, STATE), ValueError,
     "regression_kd: noise augmentation needs float inputs, batch['input'] has dtype "
     "torch.int64 (set copies: 0 for token inputs)"),
]


@pytest.mark.parametrize(("call", "error", "message"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_recipe_errors_say_what_is_wrong(call: Callable[[], object], error: type[Exception],
                                         message: str) -> None:
    with pytest.raises(error) as raised:
        call()
    assert type(raised.value) is error
    assert str(raised.value) == message


@pytest.mark.parametrize("recipe", ["denoise", "adversarial"])
@pytest.mark.parametrize("value_range", [(0.5, 0.5), (1.0, 0.0)])
def test_a_value_range_must_be_increasing(recipe: str, value_range: tuple[float, float]) -> None:
    """``value_range`` (low, high) needs low < high strictly: an empty range is refused."""
    expected = f"value_range must be (low, high) with low < high, got {value_range}"
    with pytest.raises(ValueError, match=re.escape(f"Value error, {expected} [")):
        build_recipe(recipe, value_range=value_range)
    assert build_recipe(recipe, value_range=(0.5, 0.5000001)).params.value_range == (0.5,
                                                                                    0.5000001)
