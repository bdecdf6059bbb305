"""Where engines run: core lists, the core check, and the layout ``stagemesh up`` picks
for a host's shape (pure logic, no I/O)."""

from __future__ import annotations

import os

import pytest

from services.placement import (
    Layout,
    PlacementError,
    check_cores,
    choose_layout,
    format_cores,
    parse_cores,
    split_cores,
)


def engine_cores(layout: Layout) -> list[set[int]]:
    return [set(engine.cores) for engine in layout.engines]


def assert_engines_own_their_cores(layout: Layout) -> None:
    seen: set[int] = set()
    for cores in engine_cores(layout):
        assert cores and not cores & seen, layout
        seen |= cores
    if set(layout.light_cores) != set().union(*engine_cores(layout)):  # reserved, not shared
        assert not set(layout.light_cores) & seen, layout


def test_core_lists_round_trip() -> None:
    assert parse_cores("0-3,6") == [0, 1, 2, 3, 6]
    assert parse_cores(" 5, 1-2 ,1") == [1, 2, 5]
    assert format_cores([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert format_cores([3]) == "3"
    for bad in ("", "a", "3-1", "-1", "0-"):
        with pytest.raises(PlacementError):
            parse_cores(bad)


def test_a_core_outside_the_allowed_set_is_named() -> None:
    assert check_cores("", [0, 1]) == [0, 1]  # empty: every allowed core
    assert check_cores("1", [0, 1]) == [1]
    with pytest.raises(
        PlacementError, match=r"core\(s\) 2-3 are outside the cores this process may use \(0-1"
    ):
        check_cores("0-3", [0, 1])


def test_two_cores_run_one_engine_on_both() -> None:
    layout = choose_layout([0, 1])
    assert layout.name == "aggregated"
    assert [(e.role, e.cores) for e in layout.engines] == [("decode", (0, 1))]
    assert layout.light_cores == (0, 1)  # too few cores to reserve one: the light stages share
    assert not layout.kvstore  # no prefill engine reads or writes a store
    assert layout.disagg_min_tokens is None


def test_four_and_eight_cores_reserve_one_core_and_stay_aggregated() -> None:
    for count in (4, 8):
        layout = choose_layout(range(count))
        assert layout.name == "aggregated"
        assert layout.light_cores == (0,)
        assert engine_cores(layout) == [set(range(1, count))]
        assert_engines_own_their_cores(layout)


def test_sixty_four_cores_disaggregate() -> None:
    layout = choose_layout(range(64))
    assert layout.name == "pd"
    assert layout.light_cores == (0, 1, 2, 3)  # one core in 16
    assert (layout.count("prefill"), layout.count("decode")) == (1, 6)
    assert all(len(cores) >= 8 for cores in engine_cores(layout))
    assert_engines_own_their_cores(layout)
    assert layout.kvstore and layout.disagg_min_tokens is not None


def test_gpus_get_one_engine_each() -> None:
    one = choose_layout(range(8), gpus=1)
    assert one.name == "aggregated" and [e.gpu for e in one.engines] == [0]
    two = choose_layout(range(8), gpus=2)
    assert [(e.role, e.gpu) for e in two.engines] == [("prefill", 0), ("decode", 1)]
    eight = choose_layout(range(64), gpus=8)
    assert (eight.count("prefill"), eight.count("decode")) == (2, 6)
    assert sorted(e.gpu if e.gpu is not None else -1 for e in eight.engines) == list(range(8))
    assert all(len(e.cores) == 4 for e in eight.engines)  # host cores per GPU engine, capped
    assert_engines_own_their_cores(eight)
    gpu_on_two_cores = choose_layout([0, 1], gpus=1)
    assert gpu_on_two_cores.engines[0].cores == (0, 1)


def test_overrides() -> None:
    pd = choose_layout([0, 1], layout="pd")
    assert [(e.role, e.cores) for e in pd.engines] == [("prefill", (0,)), ("decode", (1,))]
    assert (
        pd.kvstore and pd.disagg_min_tokens is None
    )  # an asked-for layout keeps the router's default
    aggregated = choose_layout(range(64), layout="aggregated")
    assert aggregated.count("prefill") == 0 and aggregated.count("decode") == 7
    counted = choose_layout([0, 1], prefill=0, decode=2)
    assert engine_cores(counted) == [{0}, {1}]
    with pytest.raises(PlacementError, match="drop --prefill"):
        choose_layout([0, 1], layout="aggregated", prefill=1)
    with pytest.raises(PlacementError, match="only 1 GPU"):
        choose_layout(range(8), gpus=1, layout="pd")
    with pytest.raises(PlacementError):
        choose_layout([0, 1], decode=0)


def test_split_cores_gives_each_engine_its_own() -> None:
    assert split_cores([0, 1], 2) == [[0], [1]]
    assert split_cores([0, 1, 2, 3, 4], 2) == [[0, 1], [2, 3, 4]]
    assert split_cores([0, 1], 3) == [[0], [1], [0]]  # more engines than cores: shared
    assert split_cores(list(range(12)), 2, at_most=4) == [[0, 1, 2, 3], [6, 7, 8, 9]]


def test_this_hosts_layout_is_printable() -> None:
    text = choose_layout(sorted(os.sched_getaffinity(0))).describe()
    assert text.startswith("layout ") and "light" in text
