"""The sparse teacher signal of a language model: top-k logits plus the tail's mass cached for
[B, L, V] token logits and read by token_kd for each divergence it serves (equal to dense when
the tail is negligible, a lower bound short by at most the stated bound otherwise), sampled
tokens with importance weights (an unbiased forward KL, checked by Monte Carlo), the sizes at
a 49,152-token vocabulary, the refusals, and the tokens/s of the run report. Tiny models built
here (never a real one)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lm_models import EOS, PAD, VOCAB, save_llama, tiny_llama
from pydantic import ValidationError
from torch import nn

from kdistill import losses
from kdistill.batch import TOKEN_MASK
from kdistill.cache import CachedTeacher, CacheMismatch, LogitSample, TeacherCache
from kdistill.config import CacheConfig, parse_config
from kdistill.data.lm import TokenBlocks, pack, pad_rows
from kdistill.evaluate import benchmark_models, eval_batches
from kdistill.losses import SampledLogits, TopKLogits, TopKLogitsError, sample_logits
from kdistill.recipes import build_recipe
from kdistill.report import markdown_table
from kdistill.run import build_data, build_teacher_cache
from kdistill.schedules import TrainState
from kdistill.taps import Taps

V = len(VOCAB)


def pairs() -> TokenBlocks:
    """Prompt/completion rows of different lengths: padding and prompts to leave out."""
    sequences = [[4, 5, 6, 7, 8, EOS], [9, 10, 11, EOS], [12, 13, 14, 15, 16, 17, 18, EOS],
                 [19, 20, EOS]]
    return pad_rows(sequences, [3, 1, 5, 2], block_size=16, pad_id=PAD)


class Sharp(nn.Module):
    """A tiny Llama whose logits outside each position's top 8 are lowered by 60: a tail mass
    of about 1e-24."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_llama(seed=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        z = self.net(input_ids=input_ids, attention_mask=attention_mask).logits
        kept = torch.zeros_like(z, dtype=torch.bool).scatter(-1, z.topk(8, -1).indices, True)
        return {"logits": torch.where(kept, z, z - 60.0)}


def build(teacher: nn.Module, data, path: Path, **options) -> TeacherCache:
    return TeacherCache.build(teacher, data, ["logits"], path,
                              **{"batch_size": 2, "progress": False, **options})


def cached_logits(cache: TeacherCache, batch: dict):
    source = CachedTeacher(cache)
    source.bind(["logits"], torch.device("cpu"))
    return source(batch)["logits"]


def kd_term(recipe, z_s, z_t, batch) -> float:
    return float(recipe.terms(Taps({"logits": z_s}), Taps({"logits": z_t}), batch,
                              TrainState())["kd"].value)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("divergence", ["forward_kl", "tvd", "generalized_jsd"])
def test_cached_top_k_with_a_negligible_tail_equals_dense_logits(tmp_path, divergence,
                                                                 temperature):
    data, teacher = pairs(), Sharp()
    cache = build(teacher, data, tmp_path / "top", top_k=8)
    batch = data.rows([0, 1, 2, 3])
    top = cached_logits(cache, batch)
    with torch.no_grad():
        dense = teacher(batch["input_ids"], batch["attention_mask"])["logits"]
        z_s = tiny_llama(seed=0)(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"]).logits
    assert isinstance(top, TopKLogits) and top.shape == dense.shape == (4, 7, V)
    params = {"beta": 0.3} if divergence == "generalized_jsd" else {}
    recipe = build_recipe("token_kd", divergence=divergence, temperature=temperature, **params)
    expected = kd_term(recipe, z_s, dense, batch)
    assert expected > 1e-3  # the student is far from the teacher: the comparison means something
    assert kd_term(recipe, z_s, top, batch) == pytest.approx(expected, abs=1e-6)


def test_bucket_divergences_are_lower_bounds_short_by_at_most_the_tail_bound():
    torch.manual_seed(0)
    z_s, z_t = torch.randn(64, 50, dtype=torch.float64), 2 * torch.randn(64, 50,
                                                                         dtype=torch.float64)
    kept = z_t.topk(5, -1)
    top = TopKLogits(kept.values, kept.indices,
                     z_t.scatter(-1, kept.indices, -math.inf).logsumexp(-1), 50)
    p, q = z_t.softmax(-1), z_s.softmax(-1)
    in_tail = torch.ones_like(p, dtype=torch.bool).scatter(-1, kept.indices, False)
    p_tail, q_tail = (p * in_tail).sum(-1), (q * in_tail).sum(-1)

    def gap(name: str, **params) -> torch.Tensor:
        per_token = getattr(losses, f"per_token_{name}")
        return per_token(z_s, z_t, **params) - per_token(z_s, top, **params)

    # forward KL: exactly the tail's mass times the KL of the conditionals inside the tail
    within = torch.where(in_tail, (p / p_tail[:, None]) * ((p / p_tail[:, None]).log()
                                                           - (q / q_tail[:, None]).log()), 0.0)
    assert torch.allclose(gap("forward_kl"), p_tail * within.sum(-1), atol=1e-10)
    tvd = gap("tvd")
    assert (tvd >= -1e-12).all() and (tvd <= torch.minimum(p_tail, q_tail) + 1e-12).all()
    beta = 0.3
    jsd = gap("generalized_jsd", beta=beta)
    bound = beta * p_tail * (1 + torch.log(1 + (1 - beta) / (beta * p_tail)))
    assert (jsd >= -1e-12).all() and (jsd <= bound + 1e-12).all()
    assert tvd.max() > 1e-3 and jsd.max() > 1e-3  # a real tail, so the bounds were tested


@pytest.mark.parametrize("proposal_temperature", [1.0, 2.5])
def test_importance_sampled_kl_is_unbiased_by_monte_carlo(proposal_temperature):
    """Many independent draws of k = 4 tokens from a 6-token teacher: the mean estimate of the
    KL, and of each token's probability, is the exact value within 4 standard errors."""
    z_t = torch.tensor([2.0, 1.0, 0.5, -0.5, -1.0, -3.0], dtype=torch.float64)
    z_s = torch.tensor([0.0, 1.5, -0.5, 0.5, -2.0, 0.0], dtype=torch.float64)
    rows = 40_000
    drawn = sample_logits(z_t.expand(rows, 6), 4, proposal_temperature,
                          torch.Generator().manual_seed(0))
    estimates = losses.sampled_kl(z_s.expand(rows, 6), drawn)
    p, q = z_t.softmax(-1), z_s.softmax(-1)
    exact = float((p * (p / q).log()).sum())
    error = float(estimates.std()) / math.sqrt(rows)
    assert abs(float(estimates.mean()) - exact) < 4 * error, (float(estimates.mean()), exact)
    p_hat = torch.zeros(rows, 6, dtype=torch.float64).scatter_add_(1, drawn.indices,
                                                                    drawn.weights.double())
    errors = p_hat.std(0) / math.sqrt(rows)
    assert ((p_hat.mean(0) - p).abs() < 4 * errors).all(), (p_hat.mean(0), p)
    if proposal_temperature == 1.0:
        assert torch.allclose(drawn.weights, torch.full_like(drawn.weights, 0.25))
    else:  # real importance weights: the flatter proposal over-draws the tail
        assert drawn.weights.std() > 0.05


def test_a_sampled_cache_is_reproducible_and_gives_token_kd_its_estimate(tmp_path):
    data, teacher = pairs(), tiny_llama(seed=1)
    sample = LogitSample(draws=16, seed=3)
    cache = build(teacher, data, tmp_path / "a", sample=sample)
    again = build(teacher, data, tmp_path / "b", sample=sample)
    other = build(teacher, data, tmp_path / "c", sample=LogitSample(draws=16, seed=4))
    assert [s["sha256"] for s in cache.shards] == [s["sha256"] for s in again.shards]
    assert [s["sha256"] for s in cache.shards] != [s["sha256"] for s in other.shards]

    batch = data.rows([0, 1, 2, 3])
    drawn = cached_logits(cache, batch)
    with torch.no_grad():
        dense = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    valid = batch["attention_mask"].bool()
    log_p = dense.logits.log_softmax(-1)
    assert isinstance(drawn, SampledLogits) and drawn.shape == (4, 7, V)
    assert torch.allclose(drawn.neg_entropy[valid], (log_p.exp() * log_p).sum(-1)[valid],
                          atol=1e-5)
    assert torch.equal(drawn.weights[valid], torch.full_like(drawn.weights[valid], 1 / 16))
    assert int(drawn.indices.max()) < V

    z_s = torch.randn(4, 7, V)
    mask = batch[TOKEN_MASK].bool()
    by_hand = drawn.neg_entropy - (drawn.weights * z_s.log_softmax(-1).gather(
        -1, drawn.indices)).sum(-1)
    assert kd_term(build_recipe("token_kd"), z_s, drawn, batch) == pytest.approx(
        float(by_hand[mask].mean()), rel=1e-6)
    with pytest.raises(CacheMismatch, match=r"the storage differs \(fp32, 16 sampled logits "
                                            r"\(proposal T 1.0, seed 3\) in the cache, fp32, "
                                            r"top-8 logits asked\)"):
        build(teacher, data, tmp_path / "a", top_k=8)


def test_a_49152_token_vocabulary_caches_top_k_at_a_fraction_of_dense_logits(tmp_path):
    class Wide(nn.Module):  # [B, L, 49152] logits, the high ids among the largest
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed, self.head = nn.Embedding(V, 8), nn.Linear(8, 49_152)
            with torch.no_grad():
                self.head.bias[40_000:40_016] += 6.0

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
            return {"logits": self.head(self.embed(input_ids))}

    teacher, tokens = Wide(), torch.Generator().manual_seed(0)
    data = pack([torch.randint(4, V, (64,), generator=tokens).tolist() for _ in range(4)], 32,
                PAD, "random")
    dense = build(teacher, data, tmp_path / "dense", dtype="fp16")
    top = build(teacher, data, tmp_path / "top", dtype="fp16", top_k=32)
    drawn = build(teacher, data, tmp_path / "sampled", dtype="fp16",
                  sample=LogitSample(draws=32))
    positions = data.inputs.numel()  # rows padded to the longest, 32: padding is stored too
    stored = {name: sum(t.nbytes for shard in cache._tensors for t in shard.values())
              for name, cache in (("dense", dense), ("top", top), ("sampled", drawn))}
    lengths = 4 * len(data)  # one int32 length a row
    assert stored["dense"] == positions * 49_152 * 2 + lengths
    assert stored["top"] == positions * (32 * 2 + 32 * 2 + 4) + lengths  # int16 ids
    assert stored["sampled"] == positions * (32 * 2 + 32 * 4 + 4) + lengths
    assert dense.nbytes / top.nbytes > 700  # files, headers included: 744x in the tensors

    batch = data.rows(list(range(len(data))))
    answer = cached_logits(top, batch)
    with torch.no_grad():
        exact = teacher(batch["input_ids"], batch["attention_mask"])["logits"].topk(32, -1)
    valid = batch["attention_mask"].bool()  # the last block's padding holds zeros
    assert torch.equal(answer.indices[valid], exact.indices[valid])  # ids from 32,768 on too
    assert int(answer.indices.max()) >= 40_000
    assert torch.equal(answer.values[valid], exact.values[valid].half().float())


def test_divergences_without_a_sound_sparse_formula_are_refused_by_name():
    batch = pairs().rows([0, 1])
    z = torch.randn(2, 7, V)
    top = TopKLogits(*z.topk(8, -1), torch.zeros(2, 7), V)
    drawn = sample_logits(z, 4, generator=torch.Generator().manual_seed(0))
    cases = [
        ({"divergence": "reverse_kl"}, top,
         r"token_kd: the teacher cache keeps the top-8 logits plus the tail's mass; divergence "
         r"'reverse_kl' \(KL\(p_s \|\| p_t\)\) misses the student's tail mass times its "
         r"divergence inside the teacher's tail, which nothing the cache keeps bounds: use "
         r"forward_kl, tvd or generalized_jsd with beta < 1 with this cache, or cache dense "
         r"logits"),
        ({"divergence": "generalized_jsd", "beta": 1.0}, top,
         r"token_kd: .* divergence 'generalized_jsd at beta 1' \(KL\(p_s \|\| p_t\)\)"),
        ({"divergence": "tvd"}, drawn,
         r"token_kd: the teacher cache keeps 4 tokens sampled from the teacher's distribution, "
         r"an unbiased estimate of the forward KL at temperature 1 alone; divergence 'tvd' at "
         r"temperature 1.0 has no such estimate: use forward_kl at temperature 1 with this "
         r"cache, or cache dense or top-k logits"),
        ({"temperature": 2.0}, drawn,
         r"token_kd: .* divergence 'forward_kl' at temperature 2.0 has no such estimate"),
    ]
    for params, teacher, message in cases:
        with pytest.raises(ValueError, match=message):
            kd_term(build_recipe("token_kd", **params), z, teacher, batch)
    # The losses refuse on their own too, when called directly.
    with pytest.raises(ValueError, match=r"reverse_kl: top-k teacher logits \(k=8 of 100 "
                                         r"classes, from a teacher cache\) give no sound "
                                         r"reverse KL"):
        losses.reverse_kl(z, top)
    with pytest.raises(ValueError, match=r"generalized_jsd: sampled teacher logits \(4 draws "
                                         r"from a teacher cache\) give an unbiased estimate of "
                                         r"the forward KL alone"):
        losses.generalized_jsd(z, drawn)
    with pytest.raises(ValueError, match="sampled teacher logits estimate the teacher's "
                                         "distribution at temperature 1"):
        losses.forward_kl(z, drawn, temperature=2.0)
    with pytest.raises(TopKLogitsError, match=r"'softmax' is not available: the teacher's "
                                              r"logits are 4 tokens sampled"):
        drawn.softmax(-1)


def test_the_cache_settings_take_top_k_or_sample_not_both():
    assert CacheConfig(path="c", sample=12).sample == 12
    with pytest.raises(ValidationError, match="top_k and sample are two ways to store the "
                                              "logits; give one"):
        CacheConfig(path="c", top_k=8, sample=12)
    with pytest.raises(ValidationError, match=r"\['sample_seed'\] set the sampling of the "
                                              "logits; set sample"):
        CacheConfig(path="c", sample_seed=3)


def test_a_run_builds_the_sampled_cache_its_config_asks_for(tmp_path):
    folder = save_llama(tmp_path / "teacher")
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on a mat\na dog ran to it\nthe bird sang a song\n" * 4)
    cache = tmp_path / "cache"
    config = parse_config({
        "data": {"name": "lm_text", "path": str(text),
                 "options": {"tokenizer": str(folder), "test_path": str(text),
                             "block_size": 8}},
        "student": {"name": "lm_student", "options": {"teacher": str(folder), "layers": [0]}},
        "teacher": {"model": {"name": "hf_lm", "options": {"path": str(folder)}},
                    "cache": {"path": str(cache), "sample": 8, "sample_temperature": 2.0,
                              "sample_seed": 5, "shard_rows": 2, "batch_size": 1}},
        "recipe": {"name": "token_kd"}, "trainer": {"progress": False}})
    built = build_teacher_cache(config)
    assert built.spec.sample == LogitSample(8, 2.0, 5) and built.spec.top_k is None
    assert built.rows > 4
    assert [s["rows"] for s in built.shards] == [[i, min(i + 2, built.rows)]
                                                 for i in range(0, built.rows, 2)]
    assert built.layouts["logits"].sampled
    # For data given by hand (a subset of the training split, as train_run takes it).
    data = build_data(config.data)
    data.train = data.train.select([0, 2, 3])
    other = config.model_copy(update={"teacher": config.teacher.model_copy(update={
        "cache": config.teacher.cache.model_copy(update={"path": str(tmp_path / "subset")})})})
    subset = build_teacher_cache(other, data)
    assert subset.rows == 3 < built.rows and subset.path == tmp_path / "subset"


def test_the_comparison_gives_teacher_and_student_tokens_per_second():
    data = pairs()
    batches = eval_batches(data, 4)
    models = {"teacher": tiny_llama(seed=1), "student": tiny_llama(layers=1, seed=0)}
    rows = benchmark_models(models, batches, reference="teacher", teacher_logits_from="teacher",
                            latency_batch=batches[0], threads=1, repeats=3)
    tokens = int(batches[0]["attention_mask"].sum())
    assert tokens == 5 + 3 + 7 + 2  # the rows' input tokens, padding left out
    for row in rows:
        assert row["tokens_per_s"] == pytest.approx(tokens * 1000 / row["latency_ms"])
        assert {"perplexity", "agreement"} <= set(row)
    assert rows[0]["agreement"] == 1.0
    header = [cell.strip() for cell in markdown_table(rows).splitlines()[0].split("|")]
    assert header.index("tok/s") == header.index("ex/s") + 1
