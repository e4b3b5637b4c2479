import numpy as np
import pytest

from xrayfusion.core.errors import ConfigError
from xrayfusion.data.splits import carve_validation, grouped_folds, patient_id


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("person123_bacteria_456.jpeg", "person123"),
        ("person1_virus_7.jpeg", "person1"),
        ("IM-0117-0001.jpeg", "IM-0117"),
        ("NORMAL2-IM-0012-0001.jpeg", "NORMAL2-IM-0012"),
        ("NORMAL/IM-0117-0002.jpeg", "IM-0117"),
        ("scan.png", "scan"),
    ],
)
def test_patient_id(name: str, patient: str) -> None:
    assert patient_id(name) == patient


def test_carve_validation_keeps_patients_on_one_side_and_is_seeded() -> None:
    groups = [f"p{i // 3}" for i in range(300)]
    labels = [(i // 3) % 2 for i in range(300)]
    train, val = carve_validation(labels, groups, 0.2, seed=1)
    assert set(train).isdisjoint(val) and len(train) + len(val) == 300
    assert {groups[i] for i in train}.isdisjoint({groups[i] for i in val})
    assert 0.1 < len(val) / 300 < 0.3
    assert set(np.asarray(labels)[val]) == {0, 1}
    again = carve_validation(labels, groups, 0.2, seed=1)
    assert np.array_equal(again[1], val)
    other = carve_validation(labels, groups, 0.2, seed=2)
    assert not np.array_equal(other[1], val)


def test_grouped_folds_cover_every_index_once() -> None:
    groups = [f"p{i // 2}" for i in range(100)]
    labels = [i % 2 for i in range(100)]
    held = np.concatenate([h for _, h in grouped_folds(labels, groups, 5, seed=0)])
    assert sorted(held.tolist()) == list(range(100))


def test_grouped_folds_refuse_more_folds_than_the_largest_class_has_images() -> None:
    # 8 patients of one image, 4 per class: 5 stratified folds are impossible (sklearn raises a bare ValueError)
    with pytest.raises(ConfigError, match="no class has more than 4 images"):
        grouped_folds([0, 1] * 4, [f"p{i}" for i in range(8)], 5, seed=0)
    assert len(grouped_folds([0, 1] * 4, [f"p{i}" for i in range(8)], 4, seed=0)) == 4


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_bad_val_fraction(fraction: float) -> None:
    with pytest.raises(ConfigError, match="val_fraction"):
        carve_validation([0, 1] * 10, [str(i) for i in range(20)], fraction, 0)


@pytest.mark.parametrize("fraction", [0.15, 0.4, 0.45, 0.6, 0.9])
def test_val_fraction_is_the_fraction_asked_for_within_one_patient(fraction: float) -> None:
    groups = [f"p{i // 3}" for i in range(300)]  # 100 patients of 3 images
    labels = [(i // 3) % 2 for i in range(300)]
    train, val = carve_validation(labels, groups, fraction, seed=0)
    assert abs(len(val) - fraction * 300) <= 3, len(val)
    assert {groups[i] for i in train}.isdisjoint({groups[i] for i in val})
    assert abs(np.mean(np.asarray(labels)[val]) - 0.5) < 0.05  # classes stay balanced
