from condense.plots import spaced, tick_label


def test_tick_labels_are_short_at_every_magnitude():
    assert [tick_label(x) for x in (1, 10, 50, 0.5, 35.01, 641.34, 765.12, 2619.05)] == [
        "1", "10", "50", "0.5", "35", "641", "765", "2619",
    ]  # fmt: skip


def test_crowded_tick_labels_are_dropped_but_the_spread_ones_kept():
    # The CIFAR-10 comparison's distillation seconds put CUDD (641 s) and DREAM (765 s) 23 px apart.
    assert spaced([97.0, 464.0, 487.0, 573.0, 642.0], [16.0, 24.0, 24.0, 32.0, 32.0], 8) == [
        True, True, False, True, True,
    ]  # fmt: skip
    # Edges 0..20 and 28..48 are exactly 8 px apart (drawn); 50..70 is 2 px after 48 (dropped).
    assert spaced([10.0, 38.0, 60.0, 100.0], [20.0, 20.0, 20.0, 20.0], 8) == [True, True, False, True]
    # Width, not just distance: two wide labels 40 px apart collide where two narrow ones do not.
    assert spaced([0.0, 40.0], [50.0, 50.0], 8) == [True, False]
    assert spaced([0.0, 40.0], [10.0, 10.0], 8) == [True, True]
    assert spaced([], [], 8) == []
