from condense.plots import spaced, stacked, tick_label


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


def test_crowded_point_labels_stack_below_each_other_and_the_spread_ones_stay():
    # DATM, PAD and DSA on digits: three labels of 14 px height whose boxes start within 3 px.
    crowded = [(100.0, 50.0, 160.0, 64.0), (101.0, 51.0, 150.0, 65.0), (102.0, 53.0, 170.0, 67.0)]
    assert stacked(crowded, gap=1) == [50.0, 65.0, 80.0]
    # Side by side (no horizontal overlap), or a gap apart already: nothing moves.
    apart = [(0.0, 50.0, 40.0, 64.0), (41.0, 50.0, 80.0, 64.0), (0.0, 65.0, 40.0, 79.0)]
    assert stacked(apart, gap=1) == [50.0, 50.0, 65.0]
    # A box pushed down can land on a lower one, which it then clears too.
    chain = [(0.0, 0.0, 10.0, 10.0), (0.0, 5.0, 10.0, 15.0), (0.0, 12.0, 10.0, 22.0)]
    assert stacked(chain, gap=0) == [0.0, 10.0, 20.0]
    assert stacked([], gap=1) == []
