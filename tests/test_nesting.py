import pytest

from matryoshka import Nesting


def test_sizes_weights_and_iteration():
    n = Nesting([8, 16, 32, 64], weights=[1, 2, 3, 4])
    assert list(n) == [8, 16, 32, 64]
    assert n.weights == (1.0, 2.0, 3.0, 4.0)
    assert n.dim == 64
    assert len(n) == 4
    assert n.chunks == ((0, 8), (8, 16), (16, 32), (32, 64))
    assert n.index(32) == 2
    assert Nesting([8, 16]).weights == (1.0, 1.0)


def test_doubling():
    assert list(Nesting.doubling(8, 2048)) == [8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    assert list(Nesting.doubling(2, 128)) == [2, 4, 8, 16, 32, 64, 128]
    assert list(Nesting.doubling(8, 100)) == [8, 16, 32, 64, 100]
    assert list(Nesting.doubling(5, 5)) == [5]


def test_round_trip_dict_and_equality():
    n = Nesting([3, 7, 12], weights=[0.5, 1.0, 2.0])
    m = Nesting.from_dict(n.to_dict())
    assert m == n
    assert hash(m) == hash(n)
    assert m != Nesting([3, 7, 12])
    assert repr(Nesting([1, 2])) == "Nesting([1, 2])"


@pytest.mark.parametrize(
    ("sizes", "weights", "match"),
    [
        ([], None, r"sizes=\[\] is empty"),
        ([0, 8], None, r"contains 0, which is not a positive int"),
        ([-4, 8], None, r"contains -4"),
        ([2.5, 8], None, r"contains 2.5"),
        ([8, 8, 16], None, r"repeats 8.*sorted\(set\(sizes\)\)"),
        ([16, 8], None, r"is not sorted.*sorted\(sizes\) = \[8, 16\]"),
        ([8, 16], [1.0], r"weights=\[1.0\] has 1 entries but sizes=\[8, 16\] has 2"),
        ([8, 16], [1.0, -1.0], r"contains -1.0: every weight must be a finite float >= 0"),
        ([8, 16], [1.0, float("nan")], r"contains nan"),
        ([8, 16], [0.0, 0.0], r"are all zero"),
    ],
)
def test_rejects_bad_ladders(sizes, weights, match):
    with pytest.raises(ValueError, match=match):
        Nesting(sizes, weights)


def test_doubling_rejects_bad_bounds():
    with pytest.raises(ValueError, match=r"start=0 must be a positive int"):
        Nesting.doubling(0, 16)
    with pytest.raises(ValueError, match=r"stop=4 must be an int >= start=8"):
        Nesting.doubling(8, 4)


def test_check_dim_names_parameter_and_fix():
    n = Nesting([8, 16, 32])
    n.check_dim(32)
    with pytest.raises(
        ValueError,
        match=r"in_features=64 but the nesting's largest size is 32.*Nesting.doubling\(8, 64\)",
    ):
        n.check_dim(64)


def test_index_of_unknown_size():
    with pytest.raises(ValueError, match=r"m=10 is not on the nesting ladder \[8, 16\]"):
        Nesting([8, 16]).index(10)
