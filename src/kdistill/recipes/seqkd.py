"""``seqkd``: sequence-level distillation, the student trained on its teacher's completions."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import Field, model_validator
from torch import nn

from kdistill.cache.format import teacher_fingerprint
from kdistill.data.lm import BlockTokenizer, read_tokenizer
from kdistill.errors import KdistillError
from kdistill.recipes.base import Recipe, RecipeParams, Term, register
from kdistill.recipes.completion_store import CompletionStore
from kdistill.recipes.completions import (
    Decoding,
    batch_prompts,
    check_decoder_only,
    complete,
    completion_rows,
    special_ids,
)
from kdistill.recipes.shared import Weight, label_term
from kdistill.schedules import TrainState
from kdistill.settings import cache_dir
from kdistill.taps import Taps
from kdistill.teachers import TeacherSource


class SeqKDParams(RecipeParams):
    num_beams: int = Field(default=5, ge=1, description="beam size of the teacher (1: greedy)")
    max_new_tokens: int = Field(default=128, ge=1)
    tokenizer: str | None = Field(default=None, description="the data's (student's) tokenizer "
                                  "folder, when the teacher's differs")
    teacher_tokenizer: str | None = Field(default=None, description="the teacher's tokenizer "
                                          "folder, when it differs from the data's")
    store: str | None = Field(default=None, description="folder of the completion stores "
                              "(default <cache>/seqkd)")
    ce_weight: Weight = 1.0

    @model_validator(mode="after")
    def _both_tokenizers(self) -> SeqKDParams:
        if (self.tokenizer is None) != (self.teacher_tokenizer is None):
            raise ValueError("tokenizer and teacher_tokenizer go together: give both (the "
                             "teacher tokenises differently from the data) or neither")
        return self


class Retokeniser:
    """Token ids of the data's tokenizer to the teacher's and back, through the text."""

    def __init__(self, data: BlockTokenizer, teacher: BlockTokenizer):
        self.data, self.teacher = data, teacher

    def prompt(self, ids: list[int]) -> list[int]:
        """A prompt of the data for the teacher (with the teacher's own special tokens)."""
        text = self.data.tokenizer.decode(ids, skip_special_tokens=True)
        return self.teacher.encode([text])[0]

    def completion(self, ids: list[int]) -> list[int]:
        """A teacher's completion for the student: its text tokenised as the data tokenises a
        completion, ended by the data's end-of-sequence token when the teacher's ended."""
        text = self.teacher.tokenizer.decode(ids, skip_special_tokens=True)
        tokens = self.data.encode([text], special_tokens=False)[0]
        ended = bool(ids) and ids[-1] == self.teacher.eos_id and self.data.eos_id is not None
        return [*tokens, self.data.eos_id] if ended else tokens


@register
class SeqKD(Recipe):
    """Sequence-level knowledge distillation: Kim & Rush (EMNLP 2016), "Sequence-Level
    Knowledge Distillation". The teacher's mode sequence, approximated by beam search, stands
    in for the data's completion, and the student learns it with the cross-entropy::

        y^ = beam_search(p_t(. | x), num_beams),
        L = ce_weight * (1 / N) sum_{(b, t) in completions} -log p_s(y^_t | x, y^_<t)

    N the completion tokens of the global batch as read (the engine counts the prepared
    batches). The paper decodes with beam size 5, the default ``num_beams`` (1: greedy), at
    most ``max_new_tokens`` (128) tokens, up to the teacher's end-of-sequence token.

    The teacher completes each training prompt once: :meth:`prepare` looks the batch's prompts
    up in a :class:`~kdistill.recipes.completion_store.CompletionStore` (keyed by the teacher's
    weights and the generation settings, the data by prompt; ``store``, default
    ``<cache>/seqkd``), generates the missing ones (the first epoch, or never on a rerun) and
    rebuilds the rows with the teacher's completions. Beam search is deterministic, so the
    completions are those of a pass made before training. The teacher gives no taps during
    training (no teacher forward per step), so a teacher cache has nothing to serve.

    Tokeniser-free: with ``tokenizer`` (the data's, i.e. the student's) and
    ``teacher_tokenizer`` (the teacher's) folders, a prompt's text is tokenised for the
    teacher and the teacher's completion text is tokenised again for the student (with the
    data's end-of-sequence token), so the two models may have different vocabularies.
    More: docs/lm.md.
    """

    name = "seqkd"
    summary = "Sequence-level KD: CE on the teacher's beam-search completions, made once"
    paper = "Kim & Rush 2016, Sequence-Level Knowledge Distillation"
    Params = SeqKDParams
    teacher_model = "pretrained"
    task = "lm"

    def __init__(self, params: RecipeParams | None = None, **overrides: Any):
        super().__init__(params, **overrides)
        p = self.params
        self.retokeniser = (None if p.tokenizer is None else
                            Retokeniser(read_tokenizer(p.tokenizer),
                                        read_tokenizer(p.teacher_tokenizer)))
        self.generator: list[tuple[nn.Module, CompletionStore]] = []  # not a submodule

    def teacher_taps(self) -> list[str]:
        return []

    def teacher_signal_varies(self) -> str | None:
        return "it generates completions with the teacher's model, which a cache does not hold"

    def decoding(self) -> Decoding:
        return Decoding(self.params.max_new_tokens, num_beams=self.params.num_beams)

    def attach_teacher(self, teacher: TeacherSource | None) -> None:
        """Keep the teacher's model and open its completion store."""
        model = getattr(teacher, "model", None)
        if not isinstance(model, nn.Module) or not hasattr(model, "generate"):
            raise KdistillError(f"seqkd generates with the teacher's model, and the "
                                f"{type(teacher).__name__} teacher has no transformers "
                                "language model at hand")
        if self.generator and self.generator[0][0] is model:
            return
        settings = {**self.decoding().options(), "max_new_tokens": self.params.max_new_tokens}
        root = self.params.store if self.params.store is not None else cache_dir() / "seqkd"
        store = CompletionStore.open(root, teacher_fingerprint(model), settings)
        self.generator = [(model, store)]

    def teacher_completions(self, prompts: list[list[int]]) -> list[list[int]]:
        """The teacher's completion of each prompt (of the teacher's tokens), generated for the
        prompts the store lacks."""
        if not self.generator:
            raise RuntimeError("seqkd: attach_teacher must be called before training")
        model, store = self.generator[0]
        missing = store.missing(prompts)
        if missing:
            store.add(missing, complete(model, missing, self.decoding()))
        return [store[p] for p in prompts]

    def prepare(self, batch: dict[str, Any], student: Callable[[Mapping[str, Any]], Taps],
                state: TrainState) -> dict[str, Any]:
        """The batch with the teacher's completions of its prompts."""
        check_decoder_only(batch, self.name)
        prompts = batch_prompts(batch)
        change = self.retokeniser
        asked = prompts if change is None else [change.prompt(p) for p in prompts]
        completions = self.teacher_completions(asked)
        if change is not None:
            completions = [change.completion(c) for c in completions]
        model = getattr(student, "model", student)
        pad = special_ids(model)[1] if isinstance(model, nn.Module) else 0
        return completion_rows(batch, prompts, completions, pad)

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        return label_term(student["logits"], batch, weight=self.params.ce_weight)
