import pytest

from datasets.cohorts.base import Fold
from datasets.splits import SplitLeakError, audit_folds


def test_audit_names_patients_in_two_partitions():
    folds = [Fold(0, ("A", "B", "C"), ("C", "D"))]
    with pytest.raises(SplitLeakError, match=r"fold 0 .* 1 patients in two partitions: C"):
        audit_folds(folds, ["A", "B", "C", "D"])


def test_audit_names_patients_in_no_partition():
    folds = [Fold(0, ("A", "B"), ("C",))]
    with pytest.raises(SplitLeakError, match="no partition to 1 patients: D"):
        audit_folds(folds, ["A", "B", "C", "D"])


def test_audit_accepts_a_clean_split_with_test_set():
    audit_folds([Fold(0, ("A", "B"), ("C",), ("D",))], ["A", "B", "C", "D"])
