"""Subject-level splits: seeded, independent of input order, no subject in two splits, explicit
splits kept."""

from pathlib import Path

import pytest

from medlsdm.data.layouts import Case
from medlsdm.data.prepare import _splits
from medlsdm.data.splits import assign_splits, split_counts
from medlsdm.errors import ConfigError, DataError

SUBJECTS = [f"sub{i:02d}" for i in range(20)]


def test_seeded_and_order_independent():
    a = assign_splits(SUBJECTS, seed=3)
    assert a == assign_splits(list(reversed(SUBJECTS)) + SUBJECTS[:5], seed=3)  # duplicates, other order
    assert a != assign_splits(SUBJECTS, seed=4)
    assert set(a) == set(SUBJECTS)
    assert sorted(a.values()).count("train") == 14 and list(a.values()).count("val") == 3


def test_counts_every_split_non_empty():
    assert split_counts(3, [0.7, 0.15, 0.15]) == [1, 1, 1]
    assert split_counts(2, [0.7, 0.15, 0.15]) == [1, 1, 0]
    assert split_counts(1, [0.7, 0.15, 0.15]) == [1, 0, 0]
    assert split_counts(10, [1.0, 0.0, 0.0]) == [10, 0, 0]
    for n in range(3, 40):
        counts = split_counts(n, [0.7, 0.15, 0.15])
        assert sum(counts) == n and min(counts) >= 1


def test_explicit_test_split_kept_and_not_drawn_again():
    fixed = {"sub18": "test", "sub19": "test"}
    out = assign_splits(SUBJECTS, seed=0, fixed=fixed)
    assert {s for s, v in out.items() if v == "test"} == {"sub18", "sub19"}
    assert {"train", "val"} == {out[s] for s in SUBJECTS[:18]}


def test_bad_settings():
    with pytest.raises(ConfigError, match="fractions"):
        assign_splits(SUBJECTS, fractions=(0.0, 0.5, 0.5))
    with pytest.raises(ConfigError, match="fractions"):
        assign_splits(SUBJECTS, fractions=(0.5, 0.5))
    with pytest.raises(ConfigError, match="explicit splits"):
        assign_splits(SUBJECTS, fixed={"sub00": "holdout"})


def _case(case_id, subject, split=None):
    return Case(case_id, subject, [Path(f"{case_id}.nii.gz")], Path(f"{case_id}_seg.nii.gz"), ["ct"], split)


def test_cases_of_one_subject_share_a_split():
    cases = [_case(f"p{i}_s{j}", f"p{i}") for i in range(12) for j in range(3)]
    cases.append(_case("p0_extra", "p0", "test"))  # one explicit test study pulls the whole patient
    cfg = {"split": {"fractions": [0.7, 0.15, 0.15], "seed": 1}}
    splits = _splits(cases, cfg)
    assert splits["p0"] == "test" and len(splits) == 12
    with pytest.raises(DataError, match="two explicit splits"):
        _splits(cases + [_case("p0_other", "p0", "train")], cfg)


def test_counts_instead_of_fractions():
    out = assign_splits(SUBJECTS, seed=2, counts=[None, 4, 3])
    assert [list(out.values()).count(s) for s in ("train", "val", "test")] == [13, 4, 3]
    assert out == assign_splits(list(reversed(SUBJECTS)), seed=2, counts=[13, 4, 3])
    # counts apply to the subjects without an explicit split
    fixed = assign_splits(SUBJECTS, seed=2, counts=[15, 3, 0], fixed={"sub00": "test", "sub01": "test"})
    assert [list(fixed.values()).count(s) for s in ("train", "val", "test")] == [15, 3, 2]
    with pytest.raises(ConfigError, match="add up to 7 but 20 subjects"):
        assign_splits(SUBJECTS, counts=[4, 2, 1])
    with pytest.raises(ConfigError, match="ask for 30 subjects"):
        assign_splits(SUBJECTS, counts=[None, 20, 10])
    with pytest.raises(ConfigError, match="split.counts must be"):
        assign_splits(SUBJECTS, counts=[None, None, 3])
    with pytest.raises(ConfigError, match="split.counts must be"):
        assign_splits(SUBJECTS, counts=[10.5, 5, 4.5])


def test_every_subject_gets_one_split_for_any_seed():
    cases = [_case(f"p{i}_s{j}", f"p{i}") for i in range(9) for j in range(1 + i % 3)]
    for seed in range(20):
        splits = _splits(cases, {"split": {"fractions": [0.6, 0.2, 0.2], "counts": None, "seed": seed}})
        assert set(splits) == {f"p{i}" for i in range(9)} and set(splits.values()) == {"train", "val", "test"}
