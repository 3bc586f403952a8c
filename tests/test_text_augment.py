"""Text augmentation for the transfer set: EDA word dropout and swap, teacher-embedding
neighbours, masked-LM replacement (TinyBERT), whole corpora and tagged sentences."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

from kdistill.errors import KdistillError
from kdistill.models.hf import UnsafeModelFolder
from kdistill.text_augment import (
    EmbeddingNeighbours,
    MaskedLMReplacement,
    TextAugmentSettings,
    augment_corpus,
    augment_tagged,
    join_words,
    load_replacer,
    read_word_embeddings,
    split_words,
    top_k_cosine,
    word_dropout,
    word_swap,
)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Hand-made geometry: (token, angle in degrees, norm). Cosine similarity is cos(angle gap);
# the norms differ so that a dot product would rank differently. Special tokens (among them
# the alphabetic "eos"), the "##s" piece and "," sit closer to "cat" than any word does: they
# must never be candidates.
GEOMETRY = [("[PAD]", 1, 1), ("[UNK]", 1, 1), ("[CLS]", 1, 1), ("[SEP]", 1, 1),
            ("[MASK]", 1, 1), ("cat", 0, 1), ("dog", 20, 0.1), ("car", 50, 5),
            ("bus", 100, 1), ("red", 200, 2), ("blue", 250, 1), ("##s", 1, 1), (",", 2, 1),
            ("eos", 1, 1), ("##y", 100, 1)]
MLM_VOCAB = SPECIALS + ["the", "cat", "dog", "car", "sat", "on", "mat", "play", "##ing", ",",
                        "."]


def make_tokenizer(folder: Path, vocab: list[str], **special: list[str]) -> BertTokenizerFast:
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return BertTokenizerFast.from_pretrained(folder, **special)


@pytest.fixture(scope="module")
def geometry(tmp_path_factory: pytest.TempPathFactory) -> EmbeddingNeighbours:
    tokenizer = make_tokenizer(tmp_path_factory.mktemp("geometry"), [t for t, *_ in GEOMETRY],
                               additional_special_tokens=["eos"])
    matrix = torch.tensor([[n * math.cos(math.radians(a)), n * math.sin(math.radians(a))]
                           for _, a, n in GEOMETRY])
    return EmbeddingNeighbours(tokenizer, matrix)


@pytest.fixture(scope="module")
def mlm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BertForMaskedLM with its tokenizer, saved with save_pretrained; its output bias
    ranks cat > dog > car above every other whole word, with special tokens, the "##ing"
    piece and "," ranked higher still."""
    folder = tmp_path_factory.mktemp("mlm")
    tokenizer = make_tokenizer(folder, MLM_VOCAB)
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(MLM_VOCAB), hidden_size=32,
                                       num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=37))
    bias = torch.zeros(len(MLM_VOCAB))
    for token, value in [("cat", 100), ("dog", 50), ("car", 25), ("[MASK]", 1000),
                         ("[PAD]", 900), ("[UNK]", 800), ("##ing", 500), (",", 300)]:
        bias[tokenizer.convert_tokens_to_ids(token)] = value
    with torch.no_grad():
        model.cls.predictions.bias.copy_(bias)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def settings(**values) -> TextAugmentSettings:
    return TextAugmentSettings(**{"model": "teacher-folder", **values})


# ----------------------------------------------------------------------------------- words


def test_split_keeps_punctuation_and_contractions_and_join_reverses_it():
    text = "Don't panic, Bob (really)!"
    words = split_words(text)
    assert words == ["Don't", "panic", ",", "Bob", "(", "really", ")", "!"]
    assert join_words(words) == text
    assert split_words(join_words(["a", "'", "b", ".", "."])) == ["a", "'", "b", ".", "."]


# ------------------------------------------------------------------------------------- EDA


def test_word_dropout_rate_order_and_never_empty():
    words = [f"w{i}" for i in range(10_000)]
    kept = word_dropout(words, 0.3, random.Random(0))
    assert abs(len(kept) / len(words) - 0.7) < 0.03  # 5 standard deviations: 0.0046 each
    positions = [int(w[1:]) for w in kept]
    assert positions == sorted(positions)  # a subsequence: order is kept
    assert word_dropout(words[:5], 0.0, random.Random(0)) == words[:5]
    survivors = {tuple(word_dropout(["a", "b", "c"], 1.0, random.Random(s))) for s in range(50)}
    assert survivors == {("a",), ("b",), ("c",)}  # one word kept, chosen uniformly
    with pytest.raises(ValueError, match="word_dropout: needs at least one word"):
        word_dropout([], 0.1, random.Random(0))


def test_word_swap_keeps_length_and_multiset():
    words = [f"w{i}" for i in range(20)]
    swapped = word_swap(words, 3, random.Random(1))
    assert len(swapped) == 20 and Counter(swapped) == Counter(words) and swapped != words
    for seed in range(200):  # one swap always exchanges two distinct positions
        once = word_swap(words, 1, random.Random(seed))
        assert sum(a != b for a, b in zip(words, once, strict=True)) == 2
    assert word_swap(words, 0, random.Random(0)) == words
    assert word_swap(["solo"], 5, random.Random(0)) == ["solo"]
    with pytest.raises(ValueError, match="n_swaps must be >= 0"):
        word_swap(words, -1, random.Random(0))


def test_eda_is_reproducible_for_a_seed_and_differs_across_seeds():
    words = [f"w{i}" for i in range(30)]
    for op, arg in ((word_dropout, 0.3), (word_swap, 4)):
        assert op(words, arg, random.Random(7)) == op(words, arg, random.Random(7))
        assert op(words, arg, random.Random(7)) != op(words, arg, random.Random(8))


# ---------------------------------------------------------------------- embedding neighbours


def test_neighbours_follow_cosine_geometry_and_skip_pieces_and_specials(geometry):
    found = geometry.neighbours(["cat", "bus", "red"], k=2)
    # cat 0 deg: dog 20, car 50 (a dot product would put car, norm 5, first)
    assert found == {"cat": ["dog", "car"], "bus": ["car", "dog"], "red": ["blue", "bus"]}
    assert set(geometry.candidate_tokens) == {"cat", "dog", "car", "bus", "red", "blue"}
    # all 5 other whole words: never the word itself, a special token, "##s" or ","
    assert geometry.tokenizer.tokenize("eos") == ["eos"]
    assert geometry.neighbours(["cat"], k=10)["cat"] == ["dog", "car", "bus", "blue", "red"]


def test_split_words_use_the_mean_of_their_pieces_and_unknown_words_have_none(geometry):
    # "cats" = cat + ##s: their mean lies at about 0.5 deg, nearest "cat" (not excluded: the
    # word is not that entry)
    assert geometry.neighbours(["cats"], k=2)["cats"] == ["cat", "dog"]
    # "caty" = cat (0 deg) + ##y (100 deg): the mean points at 50 deg, where "car" is
    assert geometry.neighbours(["caty"], k=1)["caty"] == ["car"]
    assert geometry.candidates(["zebra", ",", "42", "Cat"], k=2) == [[], [], [], ["dog", "car"]]


def test_chunked_top_k_equals_the_dense_computation():
    torch.manual_seed(0)
    queries, keys = torch.randn(50, 8), torch.randn(300, 8)
    values, indices = top_k_cosine(queries, keys, 5, chunk=7)
    dense = (F.normalize(queries, dim=1) @ F.normalize(keys, dim=1).T).topk(5, dim=1)
    assert torch.equal(indices, dense.indices)
    assert torch.allclose(values, dense.values, atol=1e-6)


def test_replacement_rate_is_p(geometry):
    words = ["cat", "bus", ",", "red"] * 1000  # 3000 replaceable words, 1000 commas
    out = geometry.replace(words, 0.4, 2, random.Random(0))
    changed = [(a, b) for a, b in zip(words, out, strict=True) if a != b]
    assert abs(len(changed) / 3000 - 0.4) < 0.045  # 5 standard deviations: 0.0089 each
    allowed = geometry.neighbours({"cat", "bus", "red"}, 2)
    assert all(b in allowed[a] for a, b in changed)  # "," never changes
    assert geometry.replace(words, 0.0, 2, random.Random(0)) == words


def test_embedding_rows_must_cover_the_vocabulary(geometry, tmp_path):
    with pytest.raises(KdistillError, match="has id 10 but the embedding matrix only 4 rows"):
        EmbeddingNeighbours(geometry.tokenizer, torch.zeros(4, 2))
    with pytest.raises(KdistillError, match="the tokenizer has no whole-word entries"):
        EmbeddingNeighbours(make_tokenizer(tmp_path, SPECIALS + ["##s", ","]), torch.zeros(7, 2))


def test_from_folder_reads_the_embedding_matrix_from_safetensors(mlm_folder):
    model = BertForMaskedLM.from_pretrained(mlm_folder)
    expected = model.get_input_embeddings().weight
    assert torch.equal(read_word_embeddings(mlm_folder), expected)
    neighbours = EmbeddingNeighbours.from_folder(mlm_folder)
    assert torch.equal(neighbours.embeddings, expected)
    own = EmbeddingNeighbours(neighbours.tokenizer, expected)
    assert neighbours.neighbours(["cat", "mat"], 3) == own.neighbours(["cat", "mat"], 3)


def test_sharded_weights_are_read_through_their_index(mlm_folder, tmp_path):
    (tmp_path / "shard-1.safetensors").write_bytes((mlm_folder / "model.safetensors").read_bytes())
    index = tmp_path / "model.safetensors.index.json"
    name = "bert.embeddings.word_embeddings.weight"
    index.write_text(json.dumps({"weight_map": {name: "shard-1.safetensors"}}))
    assert torch.equal(read_word_embeddings(tmp_path), read_word_embeddings(mlm_folder))
    index.write_text(json.dumps({"weight_map": {"head.weight": "shard-1.safetensors"}}))
    with pytest.raises(KdistillError, match=r"expected one tensor named '\*word_embeddings\.weight'"
                                            r" \(the input embeddings\), found none; tensors: "
                                            r"head\.weight$"):
        read_word_embeddings(tmp_path)
    index.write_text("[]")
    with pytest.raises(KdistillError, match="not a safetensors index with a 'weight_map'"):
        read_word_embeddings(tmp_path)


def test_unsafe_or_incomplete_folders_are_refused(mlm_folder, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((mlm_folder / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(UnsafeModelFolder, match=r"^teacher\.path: .* only as pickle"):
        EmbeddingNeighbours.from_folder(pickled)
    coded = tmp_path / "coded"
    coded.mkdir()
    config = json.loads((mlm_folder / "config.json").read_text())
    (coded / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.M"}}))
    (coded / "model.safetensors").write_bytes((mlm_folder / "model.safetensors").read_bytes())
    with pytest.raises(UnsafeModelFolder, match=r"^data\.augment\.trust_remote_code: "):
        MaskedLMReplacement.from_folder(coded, where="data.augment")
    with pytest.raises(UnsafeModelFolder, match="config.json missing"):
        load_replacer("embedding", tmp_path / "nowhere")


# ---------------------------------------------------------------------- masked language model


def test_mlm_takes_the_top_predictions_except_the_word_and_special_tokens(mlm_folder):
    replacer = MaskedLMReplacement.from_folder(mlm_folder)
    assert not replacer.model.training
    words = ["the", "cat", "sat", "on", "the", "mat", "."]
    got = replacer.candidates(words, k=2)
    # bias ranks [MASK] [PAD] [UNK] ##ing , cat dog car: whole words only, never the word
    assert got[1] == ["dog", "car"]
    assert got[0] == got[2] == got[5] == ["cat", "dog"]
    assert got[6] == []  # punctuation is never replaced
    out = replacer.replace(words, 1.0, 1, random.Random(0))
    assert out == ["cat", "dog", "cat", "cat", "cat", "cat", "."]


def test_mlm_uses_embedding_neighbours_for_words_of_several_pieces(mlm_folder):
    replacer = MaskedLMReplacement.from_folder(mlm_folder)
    got = replacer.candidates(["the", "playing", "cat"], k=3)
    assert got[1] == replacer.neighbours.neighbours(["playing"], 3)["playing"]
    assert got[1] != ["cat", "dog", "car"]  # not the masked LM's ranking


def test_mlm_masks_each_word_in_context_batched(mlm_folder):
    """With a small random output bias the context decides: compare with one forward pass
    per masked word, done by hand."""
    tokenizer = BertTokenizerFast.from_pretrained(mlm_folder)
    model = BertForMaskedLM.from_pretrained(mlm_folder)
    with torch.no_grad():
        model.cls.predictions.bias.copy_(torch.randn(len(MLM_VOCAB), generator=torch.Generator()
                                                     .manual_seed(3)))
    model.train()  # the replacer must switch to eval mode (dropout off)
    replacer = MaskedLMReplacement(model, tokenizer, batch_size=2)
    assert not model.training
    words = ["the", "cat", "sat", "on", "the", "mat"]
    got = replacer.candidates(words, k=3)
    whole = [tokenizer.convert_tokens_to_ids(t) for t in ["the", "cat", "dog", "car", "sat",
                                                          "on", "mat", "play"]]
    ids = tokenizer(words, is_split_into_words=True, return_tensors="pt")["input_ids"]
    for i, word in enumerate(words):
        masked = ids.clone()
        masked[0, i + 1] = tokenizer.mask_token_id  # +1: [CLS]
        with torch.no_grad():
            logits = model(input_ids=masked).logits[0, i + 1]
        ranked = sorted(whole, key=lambda t: -float(logits[t]))
        expected = [tokenizer.convert_ids_to_tokens(t) for t in ranked if
                    tokenizer.convert_ids_to_tokens(t) != word][:3]
        assert got[i] == expected, word
    assert replacer.candidates(words, k=3) == got  # eval mode: deterministic


# ------------------------------------------------------------------------------ corpora


def test_settings_defaults_are_tinyberts_and_fields_are_checked():
    default = TextAugmentSettings(model="teacher-folder")
    assert (default.copies, default.p_replace, default.k) == (20, 0.4, 15)
    with pytest.raises(ValidationError, match="set 'model' to a local model folder"):
        TextAugmentSettings()
    with pytest.raises(ValidationError, match="p_replace"):
        TextAugmentSettings(p_replace=1.5)
    with pytest.raises(ValidationError, match="copies"):
        TextAugmentSettings(copies=0)
    with pytest.raises(ValidationError, match="extra"):
        TextAugmentSettings.model_validate({"copies": 2, "p_swap": 0.1})
    with pytest.raises(ValidationError, match="these settings change no word"):
        TextAugmentSettings(method="none")


def test_corpus_copies_are_deduplicated_against_all_originals_and_each_other():
    swap = settings(method="none", n_swaps=1, copies=5)
    # the only swap of "cat dog" is "dog cat", itself an original: nothing new
    assert augment_corpus(["cat dog", "dog cat"], swap, progress=False) == []
    assert augment_corpus(["cat dog."], swap, progress=False) != []
    assert len(augment_corpus(["cat dog"], swap, progress=False)) == 1  # 5 draws, 1 new text
    assert augment_corpus(["cat cat", ""], swap, progress=False) == []


def test_corpus_gives_copies_per_text_reproducibly(geometry):
    texts = ["The cat, the dog and the bus.", "Red bus, blue car!"]
    chosen = settings(copies=4, p_replace=0.5, k=3, n_swaps=1, p_dropout=0.1, seed=3)
    out = augment_corpus(texts, chosen, geometry, progress=True)
    assert len(out) == 8 and len(set(out)) == 8
    assert augment_corpus(texts, chosen, geometry, progress=False) == out
    other = augment_corpus(texts, chosen.model_copy(update={"seed": 4}), geometry,
                           progress=False)
    assert other != out
    assert not {tuple(split_words(t)) for t in out} & {tuple(split_words(t)) for t in texts}


def test_replacing_corpus_needs_a_replacer():
    with pytest.raises(KdistillError, match="data.augment.method: 'mlm' needs a word replacer"):
        augment_corpus(["cat"], settings(method="mlm"), progress=False)
    with pytest.raises(KdistillError, match="texts must be strings; text 1 is a tuple"):
        augment_corpus(["a", ("b", "c")], settings(method="none", n_swaps=1), progress=False)


def test_tagged_copies_keep_word_count_and_tags(geometry):
    samples = [(["red", "bus", "on", "cat", "."], ["B-X", "I-X", "O", "B-Y", "O"]),
               (["dog"], [3])]
    out = augment_tagged(samples, settings(copies=6, p_replace=0.5, k=2), geometry,
                         progress=False)
    assert out and len({tuple(w) for w, _ in out}) == len(out)
    by_tags = {tuple(tags): words for words, tags in out}
    assert set(by_tags) <= {tuple(t) for _, t in samples}
    for words, tags in out:
        original = next(w for w, t in samples if list(t) == tags)
        assert len(words) == len(original)
        for new, old in zip(words, original, strict=True):
            assert new == old or new in geometry.neighbours([old], 2)[old]


def test_tagged_data_refuses_word_moves_and_misaligned_tags(geometry):
    with pytest.raises(KdistillError, match=r"^data\.augment\.p_dropout and data\.augment\."
                                            r"n_swaps: token classification data keeps one tag"):
        augment_tagged([(["a"], [0])], settings(p_dropout=0.1, n_swaps=1), geometry)
    with pytest.raises(KdistillError, match="sentence 0 has 2 words but 1 tags"):
        augment_tagged([(["a", "b"], [0])], settings(), geometry)
