"""metrics: the plain-number histogram and the bounded topic-prefix labels."""

import pytest

from pusherd.counters import Histogram
from pusherd.metrics import OTHER_PREFIX, PrefixLabels


def test_histogram_buckets_are_cumulative_with_le_semantics():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 2.0, -0.01):
        h.observe(v)
    assert h.buckets() == [("0.1", 3), ("1.0", 4), ("+Inf", 5)]
    assert h.count == 5 and h.total == pytest.approx(2.65)


def test_prefix_labels_are_bounded_and_never_a_topic():
    labels = PrefixLabels(limit=2)
    assert labels.label("public:lobby") == "public"
    assert labels.label("deploys:web") == "deploys"
    assert labels.label("users:1") == OTHER_PREFIX          # over the limit
    assert labels.label("public:other") == "public"          # known prefixes stay
    assert labels.label("nocolon") == OTHER_PREFIX
    assert labels.label("bad prefix!:x") == OTHER_PREFIX
    assert labels.channels({"public:a": {1, 2}, "public:b": {3}, "x:y": {4}}) == {"public": 3, OTHER_PREFIX: 1}
