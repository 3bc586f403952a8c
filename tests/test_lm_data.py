"""Language-modelling data (task lm): packed and padded token blocks, next-token labels,
prompt/completion pairs with labels on the completion alone, encoder-decoder rows, held-out
splits, file formats and their errors. A word-level tokenizer saved to tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lm_models import EOS, ID, PAD, save_tokenizer

from kdistill.batch import TOKEN_MASK, UNLABELED
from kdistill.batching import unit_counts
from kdistill.config import parse_config
from kdistill.data import load_dataset
from kdistill.data.lm import TokenBlocks, load_lm_hf_dataset, load_lm_text
from kdistill.errors import KdistillError

U = UNLABELED


@pytest.fixture
def tokenizer(tmp_path: Path) -> str:
    return str(save_tokenizer(tmp_path / "tokenizer"))


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def ids(text: str) -> list[int]:
    return [ID[word] for word in text.split()]


def test_plain_texts_are_packed_into_blocks_that_predict_every_next_token(tmp_path, tokenizer):
    train = write(tmp_path / "train.txt", "the cat sat\n\na dog ran\n")
    test = write(tmp_path / "test.txt", "it sang\n")
    data = load_lm_text(train, tokenizer, block_size=4, test_path=test)
    # Stream: the cat sat </s> a dog ran </s> (8 tokens, 7 of them predicted).
    stream = [*ids("the cat sat"), EOS, *ids("a dog ran"), EOS]
    columns = data.train.columns()
    assert columns["input_ids"].tolist() == [stream[0:4], [*stream[4:7], PAD]]
    assert columns["labels"].tolist() == [stream[1:5], [*stream[5:8], U]]
    assert columns["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert columns[TOKEN_MASK].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert data.test.columns()["labels"].tolist() == [[ID["sang"], EOS, U, U]]
    assert (data.task, data.num_classes) == ("lm", 100)
    assert data.train.token_count() == 7


def test_unpacked_texts_are_one_a_row_cut_at_the_block_size(tmp_path, tokenizer):
    train = write(tmp_path / "train.txt", "the cat sat on a mat\na dog\n")
    data = load_lm_text(train, tokenizer, block_size=3, packing=False,
                        test_path=write(tmp_path / "t.txt", "it\n"))
    columns = data.train.columns()
    assert columns["input_ids"].tolist() == [ids("the cat sat"), [*ids("a dog"), PAD]]
    assert columns["labels"].tolist() == [ids("cat sat on"), [ID["dog"], EOS, U]]
    assert columns["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_prompt_completion_pairs_are_labelled_on_the_completion_only(tmp_path, tokenizer):
    rows = [{"q": "Q: what is the sky", "a": "blue"}, {"q": "Q: is it", "a": "yes it is"}]
    path = write(tmp_path / "pairs.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    data = load_lm_text(path, tokenizer, block_size=8, prompt_column="q",
                        completion_column="a", test_path=path)
    columns = data.train.columns()
    first = [*ids("Q: what is the sky blue"), EOS]
    second = [*ids("Q: is it yes it is"), EOS]
    assert columns["input_ids"].tolist() == [first[:-1], second[:-1]]
    # Position t predicts token t + 1: labelled only when that token is in the completion.
    assert columns["labels"].tolist() == [[U, U, U, U, ID["blue"], EOS],
                                          [U, U, ID["yes"], ID["it"], ID["is"], EOS]]
    assert columns[TOKEN_MASK].sum().item() == 2 + 4
    counts = unit_counts(data.train.rows([0, 1]))
    assert counts["tokens"] == counts["labeled"] == 6.0


def test_a_completion_is_cut_at_the_block_size_and_a_prompt_too_long_is_refused(
        tmp_path, tokenizer):
    path = write(tmp_path / "p.csv", "q,a\nQ: what is the sky,blue and green\n")
    data = load_lm_text(path, tokenizer, block_size=6, prompt_column="q",
                        completion_column="a", test_path=path)
    assert data.train.columns()["labels"].tolist() == [[U, U, U, U, ID["blue"], ID["and"]]]
    with pytest.raises(ValueError, match=r"p.csv, line 2: the prompt takes 5 tokens, leaving no "
                                         r"completion token within block_size 4"):
        load_lm_text(path, tokenizer, block_size=4, prompt_column="q", completion_column="a",
                     test_path=path)


def test_seq2seq_rows_feed_the_prompt_to_the_encoder_and_shift_the_labels(tmp_path, tokenizer):
    path = write(tmp_path / "p.tsv", "src\ttgt\nthe cat\tit sat\nthe dog ran\tno\n")
    data = load_lm_text(path, tokenizer, prompt_column="src", completion_column="tgt",
                        seq2seq=True, decoder_start_token_id=ID["<s>"], test_path=path)
    columns = data.train.columns()
    assert columns["input_ids"].tolist() == [[*ids("the cat"), PAD], ids("the dog ran")]
    assert columns["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert columns["labels"].tolist() == [[*ids("it sat"), EOS], [ID["no"], EOS, U]]
    assert columns["decoder_input_ids"].tolist() == [[ID["<s>"], *ids("it sat")],
                                                     [ID["<s>"], ID["no"], PAD]]
    assert columns["decoder_attention_mask"].tolist() == columns[TOKEN_MASK].tolist() == \
        [[1, 1, 1], [1, 1, 0]]


def test_fortune_style_files_split_texts_at_separator_lines(tmp_path, tokenizer):
    path = write(tmp_path / "fortunes", "the cat\nsat\n%\n%\na dog\n%\n")
    data = load_lm_text(path, tokenizer, separator="%", packing=False, test_path=path)
    assert data.train.columns()["input_ids"].tolist() == [ids("the cat sat"),
                                                         [*ids("a dog"), PAD]]


def test_the_held_out_texts_are_a_seeded_part_of_the_texts_never_in_both_splits(
        tmp_path, tokenizer):
    words = ["cat", "dog", "bird", "tree", "mat", "sky", "grass", "song", "it", "song"]
    path = write(tmp_path / "t.txt", "".join(f"the {w}\n" for w in words))

    def split(seed: int) -> tuple[list, list]:
        data = load_lm_text(path, tokenizer, packing=False, test_fraction=0.3, seed=seed)
        return (data.train.columns()["input_ids"][:, 1].tolist(),
                data.test.columns()["input_ids"][:, 1].tolist())

    train, test = split(0)
    assert len(test) == 3 and len(train) == 7
    assert sorted(train + test) == sorted(ID[w] for w in words)
    assert split(0) == (train, test)
    assert split(1) != (train, test)


def test_a_datasets_column_gives_the_same_rows_as_the_file(tmp_path, tokenizer):
    rows = [{"text": "the cat sat"}, {"text": "a dog ran to it"}]
    path = write(tmp_path / "t.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    from_file = load_lm_text(path, tokenizer, block_size=3, test_path=path)
    from_datasets = load_lm_hf_dataset(path, tokenizer, block_size=3, test_path=path)
    for key, value in from_file.train.columns().items():
        assert torch.equal(from_datasets.train.columns()[key], value), key


@pytest.mark.parametrize(("options", "message"), [
    ({"prompt_column": "q", "completion_column": "a", "packing": True},
     "packing: prompt/completion pairs are one a row"),
    ({"prompt_column": "q"}, "prompt_column and completion_column go together"),
    ({"seq2seq": True}, "seq2seq: an encoder-decoder model needs prompt/completion pairs"),
    ({"decoder_start_token_id": 0}, "decoder_start_token_id: only an encoder-decoder model"),
    ({"text_column": "body"}, r"text_column 'body' is not a column; columns present: q, a"),
])
def test_options_that_make_no_rows_are_refused(tmp_path, tokenizer, options, message):
    path = write(tmp_path / "p.csv", "q,a\nthe cat,sat\n")
    with pytest.raises(ValueError, match=message):
        load_lm_text(path, tokenizer, test_path=path, **options)


def test_the_tokenizer_must_be_a_folder_with_tokenizer_json(tmp_path):
    path = write(tmp_path / "t.txt", "the cat\n")
    with pytest.raises(ValueError, match=r"tokenizer: no tokenizer.json in .*nowhere"):
        load_lm_text(path, str(tmp_path / "nowhere"), test_path=path)


def test_config_names_the_data_fields_at_fault(tmp_path, tokenizer):
    path = write(tmp_path / "t.txt", "the cat\n")

    def problems(options: dict) -> str:
        raw = {"data": {"name": "lm_text", "path": path, "options": options},
               "student": {"name": "lm_student", "options": {"teacher": tokenizer,
                                                             "layers": [0]}},
               "recipe": {"name": "ce"}}
        with pytest.raises(KdistillError) as error:
            parse_config(raw)
        return str(error.value)

    assert "data.options.tokenizer: Field required" in problems({})
    assert (f"data.options.tokenizer: no tokenizer.json in {tmp_path} (give the teacher's model "
            "folder or GGUF file" in problems({"tokenizer": str(tmp_path)}))
    assert "data.options.tokenizer: GGUF file not found: m.gguf" in problems(
        {"tokenizer": "m.gguf"})
    assert "data.options.block_size: Input should be greater than or equal to 1" in problems(
        {"tokenizer": tokenizer, "block_size": 0})


def test_registered_names_reach_the_loaders(tmp_path, tokenizer):
    path = write(tmp_path / "t.txt", "the cat sat\n")
    data = load_dataset("lm_text", path=path, tokenizer=tokenizer, test_path=path)
    assert isinstance(data.train, TokenBlocks)
    selected = data.train.select([0])
    assert torch.equal(selected.columns()["labels"], data.train.columns()["labels"][:1])
