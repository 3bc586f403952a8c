"""Configuration errors: every malformed config fails before any work with a message naming the
field path (``trainer.optimizer.lr``) and, for names, the closest valid ones. Also the YAML
loader's safety, ``--set`` overrides and the user data files (CSV, npz) a config can name."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from kdistill.config import ConfigError, apply_override, load_config, parse_config
from kdistill.settings import TrainerSettings

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def base_config(**changes: Any) -> dict[str, Any]:
    """A valid raw config (Hinton KD, trained CNN teacher) with top-level ``changes``."""
    raw: dict[str, Any] = {
        "name": "unit",
        "output_dir": "runs",
        "data": {"name": "digits", "labeled": 100},
        "student": {"name": "mlp", "size": "tiny"},
        "teacher": {"model": {"name": "cnn", "size": "tiny"},
                    "train": {"epochs": 2, "optimizer": {"lr": 0.01}}},
        "recipe": {"name": "hinton", "temperature": 4.0},
        "trainer": {"epochs": 3, "optimizer": {"lr": 0.01}},
    }
    raw.update(copy.deepcopy(changes))
    return raw


def error_of(raw: Any) -> str:
    """The ConfigError message ``parse_config`` raises for ``raw``."""
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, "cfg.yaml")
    return str(caught.value)


def problem_lines(message: str) -> list[str]:
    """The per-field problems of a ConfigError message: one problem is one line
    (``source: field: message``); several follow an 'invalid configuration' line."""
    lines = message.splitlines()
    if len(lines) == 1:
        return [lines[0].split(": ", 1)[1]]
    assert lines[0].endswith(": invalid configuration")
    return [line.strip() for line in lines[1:]]


def test_base_config_is_valid() -> None:
    config = parse_config(base_config())
    assert config.recipe == {"name": "hinton", "temperature": 4.0}
    assert config.trainer.epochs == 3
    assert config.teacher is not None and config.teacher.train is not None


# -- unknown keys and wrong values ------------------------------------------------------------
def test_unknown_top_level_key_suggests_the_section() -> None:
    raw = base_config(trainr={"epochs": 3})
    assert problem_lines(error_of(raw)) == ["trainr: unknown key 'trainr'; did you mean 'trainer'?"]


def test_unknown_key_inside_trainer_names_its_path() -> None:
    raw = base_config()
    raw["trainer"]["epochz"] = 3
    assert problem_lines(error_of(raw)) == [
        "trainer.epochz: unknown key 'epochz'; did you mean 'epochs'?"]


def test_unknown_key_in_nested_teacher_training() -> None:
    raw = base_config()
    raw["teacher"]["train"]["optimiser"] = {"lr": 0.1}
    message = error_of(raw)
    assert "teacher.train.optimiser: unknown key 'optimiser'; did you mean 'optimizer'?" in message


def test_wrong_type_names_field_and_value() -> None:
    raw = base_config()
    raw["trainer"]["epochs"] = "three"
    (line,) = problem_lines(error_of(raw))
    assert line.startswith("trainer.epochs: Input should be a valid integer")
    assert line.endswith("(got 'three')")


def test_negative_learning_rate() -> None:
    raw = base_config()
    raw["trainer"]["optimizer"]["lr"] = -0.1
    assert problem_lines(error_of(raw)) == [
        "trainer.optimizer.lr: Input should be greater than 0 (got -0.1)"]


def test_misspelt_choice_suggests_the_valid_one() -> None:
    raw = base_config()
    raw["trainer"]["scheduler"] = {"name": "cosin"}
    (line,) = problem_lines(error_of(raw))
    assert line == "trainer.scheduler.name: unknown value 'cosin'; did you mean 'cosine'?"
    raw["trainer"]["scheduler"] = {"name": "zigzag"}
    assert problem_lines(error_of(raw)) == [
        "trainer.scheduler.name: unknown value 'zigzag'; valid names: constant, cosine, linear, "
        "step"]


def test_several_problems_are_listed_together() -> None:
    raw = base_config()
    raw["trainer"]["epochs"] = 0
    raw["data"]["labeled"] = 0
    lines = problem_lines(error_of(raw))
    assert sorted(lines) == [
        "data.labeled: Input should be greater than or equal to 1 (got 0)",
        "trainer.epochs: Input should be greater than or equal to 1 (got 0)",
    ]


def test_run_name_cannot_leave_the_output_folder() -> None:
    message = error_of(base_config(name="../elsewhere"))
    assert "name: String should match pattern" in message
    assert "(got '../elsewhere')" in message


# -- registered names -------------------------------------------------------------------------
def test_unknown_recipe_with_close_match() -> None:
    raw = base_config(recipe={"name": "hintn"})
    (line,) = problem_lines(error_of(raw))
    assert line.startswith("recipe.name: unknown recipe 'hintn'; did you mean 'hinton'")


def test_recipe_without_name_lists_the_recipes() -> None:
    from kdistill.recipes import RECIPES

    (line,) = problem_lines(error_of(base_config(recipe={"temperature": 2.0})))
    assert line == "recipe.name: a recipe needs a name; valid names: " + ", ".join(sorted(RECIPES))


def test_unknown_recipe_parameter_is_named() -> None:
    raw = base_config(recipe={"name": "hinton", "temprature": 2.0})
    assert problem_lines(error_of(raw)) == [
        "recipe.temprature: unknown key 'temprature'; did you mean 'temperature'?"]


def test_recipe_parameter_out_of_range() -> None:
    raw = base_config(recipe={"name": "hinton", "alpha": 1.5})
    assert problem_lines(error_of(raw)) == [
        "recipe.alpha: Input should be less than or equal to 1 (got 1.5)"]


def test_unknown_model_with_close_match() -> None:
    raw = base_config(student={"name": "mpl", "size": "tiny"})
    assert problem_lines(error_of(raw)) == [
        "student.name: unknown model 'mpl'; did you mean 'mlp'?"]


def test_unknown_size_is_the_only_problem_reported() -> None:
    raw = base_config(student={"name": "mlp", "size": "huge"})
    assert problem_lines(error_of(raw)) == [
        "student.size: unknown mlp size 'huge'; valid names: base, small, tiny"]
    raw = base_config(student={"name": "mlp", "size": "tiny2"})
    assert problem_lines(error_of(raw)) == [
        "student.size: unknown mlp size 'tiny2'; did you mean 'tiny'?"]


def test_unknown_model_option() -> None:
    raw = base_config(student={"name": "mlp", "options": {"hiden": [32]}})
    assert problem_lines(error_of(raw)) == [
        "student.options.hiden: unknown mlp option 'hiden'; did you mean 'hidden'?"]


def test_teacher_model_errors_carry_the_teacher_path() -> None:
    raw = base_config()
    raw["teacher"]["model"] = {"name": "cnn", "options": {"chanels": [8]}}
    assert problem_lines(error_of(raw)) == [
        "teacher.model.options.chanels: unknown cnn option 'chanels'; did you mean 'channels'?"]


def test_model_without_size_or_required_option() -> None:
    raw = base_config(student={"name": "mlp"})
    assert problem_lines(error_of(raw)) == [
        "student.options.hidden: model 'mlp' needs 'hidden' (or a size: base, small, tiny)"]


@pytest.mark.parametrize(("options", "expected"), [
    ({"hidden": [-3]}, "student.options.hidden.0: Input should be greater than or equal to 1 "
                       "(got -3)"),
    ({"hidden": [8], "dropout": 1.5}, "student.options.dropout: Input should be less than 1 "
                                      "(got 1.5)"),
    ({"hidden": "wide"}, "student.options.hidden: 'str' instances are not allowed as a "
                         "Sequence value (got 'wide')"),
])
def test_model_option_values_are_checked_against_the_builder(options: dict[str, Any],
                                                             expected: str) -> None:
    raw = base_config(student={"name": "mlp", "options": options})
    assert problem_lines(error_of(raw)) == [expected]


def test_unknown_data_set() -> None:
    raw = base_config(data={"name": "digit"})
    assert problem_lines(error_of(raw)) == [
        "data.name: unknown data set 'digit'; did you mean 'digits' or 'digit-lines'?"]


def test_csv_without_path() -> None:
    raw = base_config(data={"name": "csv"})
    assert problem_lines(error_of(raw)) == ["data.path: data set 'csv' needs a file path"]


def test_data_file_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nope.npz"
    raw = base_config(data={"name": "npz", "path": str(missing)})
    assert problem_lines(error_of(raw)) == [f"data.path: file not found: {missing}"]


def test_builtin_data_set_with_a_path() -> None:
    raw = base_config(data={"name": "digits", "path": __file__})
    (line,) = problem_lines(error_of(raw))
    assert line.startswith("data.path: data set 'digits' is built in and reads no file")


# -- sections that must come in pairs or alone ------------------------------------------------
def test_distilling_recipe_without_teacher() -> None:
    raw = base_config()
    del raw["teacher"]
    assert problem_lines(error_of(raw)) == [
        "teacher: recipe 'hinton' needs a teacher; add a 'teacher' section"]
    raw["recipe"] = {"name": "ce"}  # the baseline needs no teacher
    assert parse_config(raw).teacher is None


def test_phase_needing_a_teacher_without_one() -> None:
    raw = base_config(phases=[{"recipe": {"name": "ce"}, "epochs": 1},
                              {"recipe": {"name": "dkd"}, "epochs": 1}])
    del raw["recipe"], raw["teacher"]
    assert problem_lines(error_of(raw)) == [
        "teacher: recipe 'dkd' needs a teacher; add a 'teacher' section"]


def test_teacher_with_both_checkpoint_and_train(tmp_path: Path) -> None:
    weights = tmp_path / "teacher.safetensors"
    weights.write_bytes(b"")
    raw = base_config()
    raw["teacher"]["checkpoint"] = str(weights)
    (line,) = problem_lines(error_of(raw))
    assert line.startswith("teacher: both 'checkpoint' and 'train' are given; give one")


def test_teacher_with_neither_checkpoint_nor_train() -> None:
    raw = base_config()
    del raw["teacher"]["train"]
    assert problem_lines(error_of(raw)) == [
        "teacher: recipe 'hinton' distils a trained teacher; give teacher.checkpoint or "
        "teacher.train (or a fine-tuned model folder: hf, hf_text)"]


def test_teacher_recipe_needs_train_and_a_known_recipe() -> None:
    raw = base_config()
    raw["teacher"]["recipe"] = {"name": "hinten"}
    (line,) = problem_lines(error_of(raw))
    assert line.startswith("teacher.recipe.name: unknown recipe 'hinten'")
    del raw["teacher"]["train"]
    (line,) = problem_lines(error_of(raw))
    assert line.startswith("teacher: 'recipe' says how to train the teacher and needs 'train'")


def test_teacher_checkpoint_that_does_not_exist(tmp_path: Path) -> None:
    raw = base_config()
    del raw["teacher"]["train"]
    raw["teacher"]["checkpoint"] = str(tmp_path / "gone.safetensors")
    assert problem_lines(error_of(raw)) == [
        f"teacher.checkpoint: file not found: {tmp_path / 'gone.safetensors'}"]


def test_both_recipe_and_phases() -> None:
    raw = base_config(phases=[{"recipe": {"name": "ce"}, "epochs": 1}])
    (line,) = problem_lines(error_of(raw))
    assert line.startswith("(top level): both 'recipe' and 'phases' are given")


def test_neither_recipe_nor_phases() -> None:
    raw = base_config()
    del raw["recipe"]
    (line,) = problem_lines(error_of(raw))
    assert line.startswith("(top level): neither 'recipe' nor 'phases' is given")


def test_phase_errors_name_the_phase_index() -> None:
    raw = base_config(phases=[{"recipe": {"name": "ce"}, "epochs": 1},
                              {"recipe": {"name": "hinton", "temprature": 2}, "epochs": 1,
                               "epochz": 2}])
    del raw["recipe"]
    assert problem_lines(error_of(raw)) == [
        "phases.1.epochz: unknown key 'epochz'; did you mean 'epochs'?"]
    del raw["phases"][1]["epochz"]
    assert problem_lines(error_of(raw)) == [
        "phases.1.recipe.temprature: unknown key 'temprature'; did you mean 'temperature'?"]


def test_recipe_that_cannot_split_the_budget() -> None:
    raw = base_config(recipe={"name": "fitnets"})
    raw["trainer"]["epochs"] = 1
    assert problem_lines(error_of(raw)) == [
        "trainer.epochs: fitnets needs at least 2 epochs: one hint phase and one KD phase"]
    raw = base_config(recipe={"name": "fitnets", "hint_epochs": 3})
    assert problem_lines(error_of(raw)) == [
        "trainer.epochs: fitnets: hint_epochs (3) must be smaller than epochs (3)"]


# -- composite recipes ------------------------------------------------------------------------
def composite(*terms: dict[str, Any]) -> dict[str, Any]:
    return base_config(recipe={"name": "composite", "terms": list(terms)})


def test_composite_with_unknown_loss() -> None:
    raw = composite({"loss": "ce"}, {"loss": "kdd"})
    (line,) = problem_lines(error_of(raw))
    assert line.startswith("recipe.terms.1.loss: unknown loss 'kdd'; did you mean 'kd'")


def test_composite_with_bad_loss_parameter() -> None:
    raw = composite({"loss": "kd", "params": {"temprature": 2.0}})
    (line,) = problem_lines(error_of(raw))
    assert line == ("recipe.terms.0.params: unknown kd parameter 'temprature'; did you mean "
                    "'temperature'?")


def test_composite_with_bad_tap_name() -> None:
    raw = composite({"loss": "kd", "student": "logitz"})
    (line,) = problem_lines(error_of(raw))
    assert line.startswith("recipe.terms.0.student: unknown tap 'logitz'")


def test_recipe_parameter_that_is_not_a_tap() -> None:
    raw = base_config(recipe={"name": "fitnets", "student_tap": "features"})
    (line,) = problem_lines(error_of(raw))
    assert line.startswith("recipe.student_tap: unknown tap 'features'")
    assert "module:<path>" in line


def test_weight_schedule_errors_have_clean_paths() -> None:
    raw = composite({"loss": "kd"}, {"loss": "hidden_mse", "student": "module:features",
                                     "teacher": "module:features", "adapter": "linear",
                                     "weight": {"name": "linaer", "lenght": 5}})
    lines = problem_lines(error_of(raw))
    assert sorted(lines) == [
        "recipe.terms.1.weight.lenght: unknown key 'lenght'; did you mean 'length'?",
        "recipe.terms.1.weight.name: unknown value 'linaer'; did you mean 'linear' or 'cosine'?",
    ]


def test_composite_adapter_choice() -> None:
    raw = composite({"loss": "hidden_mse", "student": "module:features",
                     "teacher": "module:features", "adapter": "lin"})
    (line,) = problem_lines(error_of(raw))
    assert line == "recipe.terms.0.adapter: unknown value 'lin'; did you mean 'linear'?"


# -- YAML files -------------------------------------------------------------------------------
def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_invalid_yaml_syntax_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "student:\n  name: mlp\ntrainer: {epochs: 3\nrecipe: {name: ce}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not valid YAML:")
    assert "line 4" in message


def test_python_object_tag_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    path = write(tmp_path, f"name: !!python/object/apply:os.system ['touch {marker}']\n"
                           "student: {name: mlp, size: tiny}\nrecipe: {name: ce}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not valid YAML: could not determine a constructor")
    assert "python/object/apply:os.system" in message
    assert "tags that build Python objects are not allowed" in message
    assert not marker.exists()


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "student: {name: mlp, size: tiny}\nrecipe: {name: ce}\n"
                           "trainer:\n  epochs: 3\n  epochs: 30\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == (f"{path}: not valid YAML: duplicate key 'epochs' at line 5, "
                                 "column 3")


@pytest.mark.parametrize(("text", "kind"), [("- student\n- recipe\n", "list"),
                                            ("just words\n", "str")])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == (f"{path}: the top level must be a mapping of sections, got "
                                 f"{kind}")


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found: .*absent.yaml"):
        load_config(tmp_path / "absent.yaml")


def test_errors_are_found_before_any_work(tmp_path: Path) -> None:
    """Loading validates everything and creates nothing: no run folder, no teacher cache."""
    out = tmp_path / "out"
    raw = base_config(output_dir=str(out))
    raw["recipe"]["temprature"] = 1.0
    path = write(tmp_path, yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="recipe.temprature"):
        load_config(path)
    good = write(tmp_path, yaml.safe_dump(base_config(output_dir=str(out))), "good.yaml")
    assert load_config(good).output_dir == str(out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "good.yaml"]


# -- --set overrides --------------------------------------------------------------------------
def test_override_changes_the_value(tmp_path: Path) -> None:
    path = write(tmp_path, yaml.safe_dump(base_config()))
    config = load_config(path, ["trainer.epochs=7", "recipe.temperature=2.5",
                                "trainer.optimizer.name=sgd", "evaluation.threads=1"])
    assert config.trainer.epochs == 7
    assert config.recipe == {"name": "hinton", "temperature": 2.5}
    assert config.trainer.optimizer.name == "sgd"
    assert config.evaluation.threads == 1
    assert load_config(path).trainer.epochs == 3  # the file itself is unchanged


def test_override_values_are_parsed_as_yaml() -> None:
    raw = base_config()
    apply_override(raw, "student.options={hidden: [32, 16]}")
    apply_override(raw, "trainer.clip_grad_norm=null")
    apply_override(raw, "name=my-run")
    assert raw["student"]["options"] == {"hidden": [32, 16]}
    assert raw["trainer"]["clip_grad_norm"] is None
    assert parse_config(raw).name == "my-run"


def test_override_without_value_is_an_error() -> None:
    with pytest.raises(ConfigError) as caught:
        apply_override(base_config(), "trainer")
    assert str(caught.value) == "--set trainer: expected KEY=VALUE, e.g. trainer.epochs=3"


def test_override_with_invalid_yaml_value() -> None:
    with pytest.raises(ConfigError, match=r"^--set trainer.epochs=\[1: not valid YAML"):
        apply_override(base_config(), "trainer.epochs=[1")


def test_override_into_a_value_is_an_error() -> None:
    with pytest.raises(ConfigError) as caught:
        apply_override(base_config(), "trainer.epochs.max=3")
    assert str(caught.value) == ("--set trainer.epochs.max: 'trainer.epochs' is a value, not a "
                                 "section")


def test_override_indexes_into_the_phases_list() -> None:
    raw = base_config(phases=[{"recipe": {"name": "ce"}, "epochs": 1},
                              {"recipe": {"name": "hinton"}, "epochs": 1}])
    del raw["recipe"]
    apply_override(raw, "phases.1.epochs=4")
    apply_override(raw, "phases.1.recipe.alpha=0.5")
    config = parse_config(raw)
    assert config.phases is not None
    assert [p.epochs for p in config.phases] == [1, 4]
    assert config.phases[1].recipe == {"name": "hinton", "alpha": 0.5}
    with pytest.raises(ConfigError) as caught:
        apply_override(raw, "phases.2.epochs=4")
    assert str(caught.value) == "--set phases.2.epochs: 'phases.2' is not an index of a list of 2"


def test_override_creates_missing_sections() -> None:
    raw = base_config()
    apply_override(raw, "evaluation.repeats=3")
    assert parse_config(raw).evaluation.repeats == 3


def test_override_that_makes_the_config_invalid(tmp_path: Path) -> None:
    path = write(tmp_path, yaml.safe_dump(base_config()))
    with pytest.raises(ConfigError) as caught:
        load_config(path, ["trainer.optimizer.lr=-1"])
    assert "trainer.optimizer.lr: Input should be greater than 0 (got -1)" in str(caught.value)


# -- the shipped examples ---------------------------------------------------------------------
def test_every_example_is_valid() -> None:
    """Each example is named after its recipe; a second example of a recipe (the recipe on
    another kind of student) is named ``<recipe>_<variant>``."""
    variants = {"deit_vit": "deit"}
    paths = sorted(EXAMPLES.glob("*.yaml"))
    assert paths, "no examples found"
    for path in paths:
        config = load_config(path)
        assert config.name == path.stem
        if config.recipe is not None:
            assert config.recipe["name"] == variants.get(path.stem, path.stem)


# -- user data files --------------------------------------------------------------------------
def write_csv(path: Path, x: np.ndarray, y: np.ndarray, label_at: int = 1,
              label: str = "label") -> Path:
    header = [f"f{i}" for i in range(x.shape[1])]
    header.insert(label_at, label)
    lines = [",".join(header)]
    for row, target in zip(x, y, strict=True):
        cells = [repr(float(v)) for v in row]
        cells.insert(label_at, str(int(target)))
        lines.append(",".join(cells))
    path.write_text("\n".join(lines) + "\n\n")  # a trailing blank line is allowed
    return path


def rows_of(data: Any) -> set[tuple[float, ...]]:
    """Every (features..., label) row of a DataSplits' train and test splits."""
    out = set()
    for split in (data.train, data.test):
        for features, label in zip(split.inputs.numpy(), split.labels.numpy(), strict=True):
            out.add((*np.round(features.astype(np.float64), 4).tolist(), int(label)))
    return out


def expected_rows(x: np.ndarray, y: np.ndarray) -> set[tuple[float, ...]]:
    return {(*np.round(row.astype(np.float32).astype(np.float64), 4).tolist(), int(t))
            for row, t in zip(x, y, strict=True)}


@pytest.fixture
def table() -> tuple[np.ndarray, np.ndarray]:
    """60 samples of 3 features and labels 0, 1, 2 (20 each)."""
    rng = np.random.default_rng(3)
    return rng.normal(size=(60, 3)), np.arange(60) % 3


def test_csv_with_label_column(tmp_path: Path, table: tuple[np.ndarray, np.ndarray]) -> None:
    from kdistill.data import load_dataset

    x, y = table
    path = write_csv(tmp_path / "points.csv", x, y, label_at=1)
    data = load_dataset("csv", path=path, test_fraction=0.25, seed=0)
    assert (data.num_classes, data.input_shape) == (3, (3,))
    assert (len(data.train), len(data.test)) == (45, 15)
    assert sorted(data.test.labels.tolist()) == [0] * 5 + [1] * 5 + [2] * 5  # stratified
    assert rows_of(data) == expected_rows(x, y)


def test_csv_through_a_config(tmp_path: Path, table: tuple[np.ndarray, np.ndarray]) -> None:
    from kdistill.run import build_data

    x, y = table
    path = write_csv(tmp_path / "points.csv", x, y, label_at=3, label="target")
    raw = base_config(data={"name": "csv", "path": str(path), "label_column": "target",
                            "labeled": 6})
    raw["teacher"]["model"] = {"name": "mlp", "size": "tiny"}
    config = parse_config(raw)
    data = build_data(config.data)
    assert data.input_shape == (3,)
    visible = data.train.labels[data.train.labels >= 0]
    assert sorted(visible.tolist()) == [0, 0, 1, 1, 2, 2]  # 6 labels, balanced


def test_csv_label_column_missing(tmp_path: Path, table: tuple[np.ndarray, np.ndarray]) -> None:
    from kdistill.data import load_dataset

    path = write_csv(tmp_path / "points.csv", *table, label="lable")
    with pytest.raises(ValueError) as caught:
        load_dataset("csv", path=path)
    assert str(caught.value) == f"{path}: unknown column 'label'; did you mean 'lable'?"
    raw = base_config(data={"name": "csv", "path": str(path)})
    assert problem_lines(error_of(raw)) == [
        "data.label_column: unknown points.csv column 'label'; did you mean 'lable'?"]


def test_csv_file_absent(tmp_path: Path) -> None:
    from kdistill.data import load_dataset

    with pytest.raises(FileNotFoundError, match="csv data file not found: .*absent.csv"):
        load_dataset("csv", path=tmp_path / "absent.csv")


def test_csv_cells_that_are_not_numbers(tmp_path: Path) -> None:
    from kdistill.data import load_dataset

    path = tmp_path / "bad.csv"
    path.write_text("a,label\n1,0\n2,one\n")
    with pytest.raises(ValueError) as caught:
        load_dataset("csv", path=path)
    assert str(caught.value) == (f"{path}, line 3, column 'label': 'one' is not a number "
                                 "(every column must be numeric)")
    path.write_text("a,b,label\n1,2,0\n3,1\n")
    with pytest.raises(ValueError, match=r"bad.csv, line 3: 2 values for 3 columns"):
        load_dataset("csv", path=path)


@pytest.mark.parametrize(("labels", "problem"), [
    ([1, 2, 3], "labels must be the integers 0..C-1 with every class present, got [1, 2, 3]"),
    ([0, 0.5, 1], "column 'label' must be integers 0..C-1, got [0.5]"),
])
def test_csv_labels_must_be_class_indices(tmp_path: Path, labels: list[float],
                                          problem: str) -> None:
    from kdistill.data import load_dataset
    from kdistill.run import build_data

    path = tmp_path / "labels.csv"
    path.write_text("a,label\n" + "".join(f"{i},{labels[i % 3]}\n" for i in range(30)))
    with pytest.raises(ValueError) as caught:
        load_dataset("csv", path=path)
    assert str(caught.value) == f"data set '{path}': {problem}"
    config = parse_config(base_config(data={"name": "csv", "path": str(path)},
                                      student={"name": "mlp", "size": "tiny"}))
    with pytest.raises(ConfigError) as wrapped:
        build_data(config.data)
    assert str(wrapped.value) == f"data.path: data set '{path}': {problem}"


def test_npz_with_x_and_y(tmp_path: Path, table: tuple[np.ndarray, np.ndarray]) -> None:
    from kdistill.data import load_dataset

    x, y = table
    path = tmp_path / "points.npz"
    np.savez(path, x=x, y=y)
    data = load_dataset("npz", path=path, test_fraction=0.5, seed=1)
    assert (len(data.train), len(data.test), data.num_classes) == (30, 30, 3)
    assert rows_of(data) == expected_rows(x, y)


def test_npz_with_given_splits(tmp_path: Path) -> None:
    from kdistill.data import load_dataset

    rng = np.random.default_rng(0)
    x_train, x_test = rng.normal(size=(12, 1, 2, 2)), rng.normal(size=(4, 1, 2, 2))
    y_train, y_test = np.arange(12) % 4, np.array([3, 2, 1, 0])
    path = tmp_path / "images.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    data = load_dataset("npz", path=path)
    assert (data.name, data.num_classes, data.input_shape) == ("images", 4, (1, 2, 2))
    np.testing.assert_array_equal(data.train.inputs.numpy(), x_train.astype(np.float32))
    np.testing.assert_array_equal(data.test.inputs.numpy(), x_test.astype(np.float32))
    assert data.train.labels.tolist() == y_train.tolist()
    assert data.test.labels.tolist() == [3, 2, 1, 0]


def test_npz_missing_arrays_are_named(tmp_path: Path) -> None:
    from kdistill.data import load_dataset

    path = tmp_path / "wrong.npz"
    np.savez(path, inputs=np.zeros((6, 2)), y=np.arange(6) % 2)
    with pytest.raises(ValueError) as caught:
        load_dataset("npz", path=path)
    assert str(caught.value).startswith(f"{path}: missing array(s) ['x']; found ['inputs', 'y']")


def test_npz_that_is_not_an_archive(tmp_path: Path) -> None:
    from kdistill.data import load_dataset

    path = tmp_path / "fake.npz"
    path.write_text("not numpy")
    with pytest.raises(ValueError, match=r"fake.npz: not an .npz archive of plain numeric"):
        load_dataset("npz", path=path)


def test_npz_labels_not_class_indices(tmp_path: Path) -> None:
    from kdistill.data import load_dataset

    path = tmp_path / "shifted.npz"
    np.savez(path, x=np.zeros((20, 2)), y=np.arange(20) % 2 + 1)
    with pytest.raises(ValueError) as caught:
        load_dataset("npz", path=path)
    assert str(caught.value) == (f"data set '{path}': labels must be the integers 0..C-1 with "
                                 "every class present, got [1, 2]")


def test_teacher_cache_key_follows_the_data_file(tmp_path: Path,
                                                 table: tuple[np.ndarray, np.ndarray]) -> None:
    """An edited data file must not reuse a teacher trained on its old content."""
    from kdistill.run import teacher_key

    x, y = table
    path = write_csv(tmp_path / "points.csv", x, y)
    raw = base_config(data={"name": "csv", "path": str(path)})
    raw["teacher"]["model"] = {"name": "mlp", "size": "tiny"}
    config = parse_config(raw)
    assert config.teacher is not None
    before = teacher_key(config.teacher, config.data)
    relabelled = parse_config({**raw, "data": {**raw["data"], "labeled": 9}})
    assert teacher_key(config.teacher, relabelled.data) == before  # the teacher sees all labels
    transfer = config.data.model_copy(update={"unlabeled": str(path), "augment": {"copies": 2}})
    assert teacher_key(config.teacher, transfer) == before  # nor the transfer set
    quiet = config.teacher.model_copy(update={"train": config.teacher.train.model_copy(
        update={"progress": False})})
    assert teacher_key(quiet, config.data) == before  # display settings do not matter

    def trained(**settings: Any) -> str:
        train = config.teacher.train.model_copy(update=settings)
        return teacher_key(config.teacher.model_copy(update={"train": train}), config.data)

    assert trained(workers=2, prefetch=4, log_every=5) == before  # speed only
    assert trained(accumulation=1, on_nonfinite="stop") == before  # defaults given

    class Later(TrainerSettings):  # a setting added in a later version, off by default
        new_option: int = 0

    later = Later(**config.teacher.train.model_dump())
    assert teacher_key(config.teacher.model_copy(update={"train": later}), config.data) == before
    assert trained(accumulation=2) != before
    assert trained(seed=config.teacher.train.seed + 1) != before
    write_csv(path, x + 1.0, y)
    assert teacher_key(config.teacher, config.data) != before


def test_cpu_threads_setting() -> None:
    # How the count is applied is tested with contexts.num_threads (tests/test_contexts.py).
    assert problem_lines(error_of(base_config(cpu_threads=0))) == [
        "cpu_threads: Input should be greater than or equal to 1 (got 0)"]
    assert parse_config(base_config(cpu_threads=1)).cpu_threads == 1


def test_every_text_example_is_valid_where_its_model_is_installed() -> None:
    """The text examples name the all-MiniLM-L6-v2 package; without it the one problem is
    the install command (checked in test_hf_text), never another field."""
    from kdistill.models.hf import INSTALLED_MODELS, model_folder

    paths = sorted((EXAMPLES / "text").glob("*.yaml"))
    assert len(paths) == 8
    try:
        model_folder("all-MiniLM-L6-v2")
    except FileNotFoundError:
        install = INSTALLED_MODELS["all-MiniLM-L6-v2"].install
        for path in paths:
            with pytest.raises(ConfigError) as caught:
                load_config(path)
            assert all(install in line for line in str(caught.value).splitlines()[1:])
        return
    for path in paths:
        config = load_config(path)
        assert config.name == f"text-{path.stem}" and config.data.name == "rotten-tomatoes"
