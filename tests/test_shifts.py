"""Shifted test data: deterministic by seed, changed by exactly the severity asked, labels kept;
the shifted evaluation scores each model on the same shifted images."""

from __future__ import annotations

import math

import pytest
import torch

from kdistill.data.base import ArrayDataset
from kdistill.data.shifts import (
    SHIFTS,
    rotate,
    shift_images,
    shifted_dataset,
)
from kdistill.evaluate import shifted_evaluation


def images(count: int = 6, side: int = 12) -> torch.Tensor:
    return torch.rand(count, 1, side, side, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("shift", SHIFTS)
def test_shifts_are_deterministic_and_severity_zero_is_identity(shift: str) -> None:
    x = images()
    first = shift_images(x, shift, 3.0, seed=5)
    assert torch.equal(first, shift_images(x, shift, 3.0, seed=5))
    assert first.shape == x.shape and first.min() >= 0 and first.max() <= 1
    assert not torch.allclose(first, x)
    assert torch.allclose(shift_images(x, shift, 0.0, seed=5), x, atol=1e-6)


def test_noise_std_follows_severity_and_seed() -> None:
    grey = torch.full((50, 1, 16, 16), 0.5)
    for severity in (1.0, 2.5):
        change = shift_images(grey, "noise", severity, seed=1) - grey
        assert change.std().item() == pytest.approx(0.04 * severity, rel=0.03)
    assert not torch.equal(shift_images(grey, "noise", 1.0, seed=1),
                           shift_images(grey, "noise", 1.0, seed=2))


def test_contrast_scales_deviation_from_the_image_mean() -> None:
    x = images()
    for severity in (1.0, 4.0):
        out = shift_images(x, "contrast", severity)
        factor = 1 - 0.15 * severity
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        assert torch.allclose(out - mean, factor * (x - mean), atol=1e-6)


def test_blur_of_a_point_is_the_gaussian_kernel() -> None:
    point = torch.zeros(1, 1, 15, 15)
    point[0, 0, 7, 7] = 1.0
    severity = 4.0
    sigma = 0.25 * severity
    out = shift_images(point, "blur", severity)[0, 0]
    radius = math.ceil(3 * sigma)
    weights = [math.exp(-0.5 * (d / sigma) ** 2) for d in range(-radius, radius + 1)]
    kernel = torch.tensor(weights) / sum(weights)
    expected = torch.zeros(15, 15)
    expected[7 - radius:8 + radius, 7 - radius:8 + radius] = torch.outer(kernel, kernel)
    assert torch.allclose(out, expected, atol=1e-6)


def test_rotation_turns_each_image_by_six_degrees_per_severity() -> None:
    square = torch.arange(16.0).view(1, 1, 4, 4) / 16
    assert torch.allclose(rotate(square, 90.0), torch.rot90(square, 1, dims=(2, 3)), atol=1e-6)
    x = images(8)
    out = shift_images(x, "rotation", 2.5, seed=3)
    plus, minus = rotate(x, 15.0), rotate(x, -15.0)
    signs = []
    for i in range(len(x)):
        if torch.allclose(out[i], plus[i].clamp(0, 1), atol=1e-6):
            signs.append(1)
        else:
            assert torch.allclose(out[i], minus[i].clamp(0, 1), atol=1e-6)
            signs.append(-1)
    assert set(signs) == {1, -1}  # the direction is drawn per image


def test_shifted_dataset_keeps_labels_and_rejects_bad_requests() -> None:
    data = ArrayDataset(images(), torch.arange(6))
    shifted = shifted_dataset(data, "blur", 2.0)
    assert torch.equal(shifted.labels, data.labels)
    assert not torch.equal(shifted.inputs, data.inputs)
    with pytest.raises(ValueError, match="unknown shift 'fog'"):
        shift_images(data.inputs, "fog", 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="severity must be in"):
        shift_images(data.inputs, "noise", 6.0)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\], got \(6, 144\)"):
        shift_images(data.inputs.flatten(1), "rotation", 1.0)
    assert shift_images(data.inputs.flatten(1), "noise", 1.0).shape == (6, 144)


def test_shifted_evaluation_scores_each_model_on_the_shifted_images(make_mlp) -> None:
    torch.manual_seed(0)
    x = torch.rand(40, 1, 8, 8)
    student, teacher = make_mlp(seed=1), make_mlp(seed=2)
    labels = student(x).argmax(dim=1)  # the student is right on every clean image
    data = ArrayDataset(x, labels)
    result = shifted_evaluation({"student": student, "teacher": teacher}, data,
                                ["noise", "contrast"], 3.0, batch_size=16, device="cpu",
                                seed=4, value_range=(0.0, 1.0))
    assert set(result) == {"student", "teacher"}
    assert set(result["student"]) == {"noise", "contrast"}  # clean accuracy is not repeated
    for name, model in (("student", student), ("teacher", teacher)):
        for shift in ("noise", "contrast"):
            with torch.no_grad():
                predicted = model(shift_images(x, shift, 3.0, seed=4)).argmax(dim=1)
            expected = (predicted == labels).double().mean().item()
            assert result[name][shift] == pytest.approx(expected)
    assert result["student"]["noise"] < 1.0


def test_shifted_evaluation_defaults_to_seed_0_and_the_data_range(make_mlp, monkeypatch) -> None:
    import kdistill.evaluate

    torch.manual_seed(0)
    x = torch.rand(60, 1, 8, 8) * 0.8 + 0.1  # values in [0.1, 0.9]
    student = make_mlp(seed=1)
    data = ArrayDataset(x, student(x).argmax(dim=1))

    def accuracy(seed: int, value_range: tuple[float, float]) -> float:
        with torch.no_grad():
            shifted = shift_images(x, "noise", 5.0, seed=seed, value_range=value_range)
            return (student(shifted).argmax(dim=1) == data.labels).double().mean().item()

    own = (float(x.min()), float(x.max()))
    assert len({accuracy(0, own), accuracy(1, own), accuracy(0, (0.0, 1.0))}) == 3
    devices: list[object] = []

    def predict(model, batches, device=None):
        devices.append(device)
        return real_predict(model, batches, device)

    real_predict = kdistill.evaluate.predict
    monkeypatch.setattr(kdistill.evaluate, "predict", predict)
    result = shifted_evaluation({"s": student}, data, ["noise"], 5.0, batch_size=16)
    assert result == {"s": {"noise": pytest.approx(accuracy(0, own))}}
    result = shifted_evaluation({"s": student}, data, ["noise"], 5.0, batch_size=16,
                                device="cpu", value_range=(0.0, 1.0))
    assert result == {"s": {"noise": pytest.approx(accuracy(0, (0.0, 1.0)))}}
    assert devices == [None, "cpu"]
