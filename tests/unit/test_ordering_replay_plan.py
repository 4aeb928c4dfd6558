"""The pure core of the write path's ordering and the readers' replay planning (no Ray)."""

from __future__ import annotations

import pickle

import pytest

from kvray.core.apply import IndexWriter, ModelHashing
from kvray.core.events import EventDecoder, WireBlockStored, encode_batch
from kvray.core.holders import Holder, base_pod, holder_id, parse_holder
from kvray.core.index.memory import MemoryIndex
from kvray.core.messages import ApplyReply, BatchOp, ClearOp
from kvray.core.ordering import ListenClocks, Order, OrderedApplier, check_order
from kvray.core.replay_plan import (
    OPEN,
    ReplaySockets,
    catch_up_plan,
    first_contact,
    offset_port,
    recovery_plan,
    take_replayed,
)
from kvray.errors import MalformedFrame

MODEL = "m"


def _applier() -> OrderedApplier:
    writer = IndexWriter(MemoryIndex(), lambda _m: ModelHashing(block_size=4))
    return OrderedApplier(writer, EventDecoder().decode, clock=lambda: 0.0)


def _stored(first_token: int, rank: int | None = None) -> bytes:
    toks = list(range(first_token, first_token + 4))
    ev = WireBlockStored([first_token], None, toks, 4, None, "GPU", None, None)
    return encode_batch([ev], ts=0.0, data_parallel_rank=rank)


# --- holders ------------------------------------------------------------------------------


def test_holder_ids_round_trip() -> None:
    assert holder_id("a", None) == holder_id("a", 0) == "a"
    assert holder_id("a", 3) == "a#dp3"
    assert parse_holder("a#dp3") == Holder("a", 3) and parse_holder("a#dp3").id == "a#dp3"
    assert parse_holder("a") == Holder("a", 0)
    assert parse_holder("a#dpx") == Holder("a#dpx", 0)  # not a rank: part of the pod id
    assert base_pod("x#dp1#dp2") == "x#dp1"


# --- ordering -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("position", "seq", "contiguous", "want"),
    [
        (None, 0, True, Order.APPLY),  # a stream's start
        (None, 5, True, Order.BEHIND),  # unknown holder mid-stream: ask from the start
        (None, 5, False, Order.APPLY),  # the sender could not heal: take it
        (4, 5, True, Order.APPLY),
        (4, 4, True, Order.DUPLICATE),
        (4, 2, False, Order.DUPLICATE),
        (4, 7, True, Order.BEHIND),
        (4, 7, False, Order.APPLY),
    ],
)
def test_check_order(position: int | None, seq: int, contiguous: bool, want: Order) -> None:
    assert check_order(position, seq, contiguous) is want


def test_applier_keeps_order_per_holder_and_reports_behind() -> None:
    a = _applier()
    res, behind = a.apply([BatchOp("p", MODEL, 0, _stored(0)), BatchOp("p", MODEL, 1, _stored(4))])
    assert behind == {} and res.stored_blocks == 2 and a.positions == {"p": 1}
    # A gap holds the holder's later ops back; another holder goes on.
    res, behind = a.apply(
        [
            BatchOp("p", MODEL, 3, _stored(8)),
            BatchOp("p", MODEL, 4, _stored(12)),
            BatchOp("q", MODEL, 0, _stored(16)),
        ]
    )
    assert behind == {"p": 1} and res.rejected == {"out_of_order": 1}
    assert a.positions == {"p": 1, "q": 0}
    res, _ = a.apply([BatchOp("p", MODEL, 1, _stored(4))])
    assert res.rejected == {"duplicate": 1}
    assert a.take_advanced() == {"p": 1, "q": 0}
    a.apply([BatchOp("p", MODEL, 2, _stored(20), decoded=EventDecoder().decode(_stored(20)))])
    assert a.take_advanced() == {"p": 2} and a.take_advanced() == {}
    res, _ = a.apply([ClearOp("p")])
    assert res.cleared == 1 and "p" not in a.positions


def test_applier_ranks_are_holders_and_malformed_is_counted() -> None:
    a = _applier()
    _, behind = a.apply([BatchOp("p", MODEL, 3, _stored(0, rank=2), contiguous=True)])
    assert behind == {"p#dp2": -1}
    a.apply([BatchOp("p", MODEL, 0, b"\x00not msgpack")])
    assert sum(a.malformed.values()) == 1 and a.ops == 2


def test_applier_mine_and_restore() -> None:
    a = _applier()
    a.apply([BatchOp("p", MODEL, 0, _stored(0, rank=1)), BatchOp("q", MODEL, 0, _stored(4))])
    assert a.mine(["p"]) == ({"p#dp1": 0}, {"p#dp1": MODEL})
    b = _applier()
    b.restore({"p#dp1": 0}, {"p#dp1": MODEL})
    assert b.positions == {"p#dp1": 0} and b.writer.models == {"p#dp1": MODEL}


def test_listen_clocks_count_only_gaps_a_reader_bridged() -> None:
    now = [100.0]
    lc = ListenClocks(max_gap_s=5.0, clock=lambda: now[0])
    assert lc.heard("r") == 0.0
    now[0] += 1.0
    assert lc.heard("r") == 1.0
    now[0] += 60.0  # an outage: nothing heard, nothing counted
    assert lc.heard("r") == 1.0 and lc.now("r") == 1.0
    now[0] += 4.0
    assert lc.heard("r") == 5.0 and lc.now("other") == 0.0


def test_listen_clocks_count_nothing_across_a_quick_restart() -> None:
    """A reader restarted within ``max_gap_s`` (a new life) was not listening meanwhile."""
    now = [100.0]
    lc = ListenClocks(max_gap_s=5.0, clock=lambda: now[0])
    assert lc.heard("ing#a") == 0.0
    now[0] += 1.0
    assert lc.heard("ing#a") == 1.0
    now[0] += 3.0  # killed and back within the gap: a new life
    assert lc.heard("ing#b") == 1.0 and lc.now("ing#a") == lc.now("ing") == 1.0
    now[0] += 2.0
    assert lc.heard("ing#b") == 3.0


def _applier_at(now: list[float]) -> OrderedApplier:
    writer = IndexWriter(MemoryIndex(), lambda _m: ModelHashing(block_size=4), clock=lambda: now[0])
    a = OrderedApplier(writer, EventDecoder().decode, clock=lambda: 0.0)
    a.listening = ListenClocks(clock=lambda: now[0])
    return a


def test_a_pod_is_silent_only_while_its_reader_listens() -> None:
    now = [0.0]
    a = _applier_at(now)
    a.apply([BatchOp("p", MODEL, 0, _stored(0))], reader="ing-0")
    a.apply([BatchOp("q", MODEL, 0, _stored(4))], reader="ing-1")
    a.apply([BatchOp("local", MODEL, 0, _stored(8))])  # a reader in the shard itself
    # ing-0 goes down for 30 s; ing-1 calls every second (its pod q says nothing).
    for _ in range(30):
        now[0] += 1.0
        a.listening.heard("ing-1")
    gone = a.drop_silent(10.0, force=True)
    assert sorted(gone) == ["local", "q"]  # p was unheard, not silent
    assert "p" in a.positions and "q" not in a.positions
    # ing-0 is back (its first call ends the outage, which adds nothing); p is dropped once
    # ing-0 has listened for more than 10 s.
    for _ in range(11):
        now[0] += 1.0
        a.listening.heard("ing-0")
        assert a.drop_silent(10.0, force=True) == []
    now[0] += 1.0
    a.listening.heard("ing-0")
    assert a.drop_silent(10.0, force=True) == ["p"] and a.positions == {}


def test_messages_pickle_as_ray_ships_them() -> None:
    ops = [BatchOp("p", MODEL, 3, b"x", False), ClearOp("p#dp1")]
    assert pickle.loads(pickle.dumps(ops)) == ops
    reply = ApplyReply(1, 2, 0, {"duplicate": 1}, {"p": 4}, "inc")
    assert pickle.loads(pickle.dumps(reply)) == reply


# --- replay planning ----------------------------------------------------------------------


def test_replay_sockets_offset_ranks() -> None:
    s = ReplaySockets()
    s.learn("tcp://h:5557", "tcp://h:6000", "p")
    assert s.for_stream("p", None, 0) == "tcp://h:6000"
    assert s.for_stream("p", None, 2) == "tcp://h:6002"
    assert s.for_stream("p", "tcp://o:1", 2) == "tcp://o:1"  # per endpoint: per rank already
    assert s.for_stream("tcp://h:5557", None) == "tcp://h:6000"
    s.forget("p")
    assert s.for_stream("p", None) is None
    assert offset_port("ipc:///x", 3) == "ipc:///x"


def test_first_contact() -> None:
    assert first_contact(3, known=5, origin_replays=False, replay_known=True).clear
    assert first_contact(9, known=5, origin_replays=False, replay_known=True).replay_from == 6
    assert first_contact(6, known=5, origin_replays=False, replay_known=False).contiguous
    assert first_contact(4, known=None, origin_replays=True, replay_known=True).replay_buffer
    assert first_contact(0, known=None, origin_replays=True, replay_known=True).contiguous
    assert not first_contact(4, known=None, origin_replays=False, replay_known=False).contiguous


def _rank0(_payload: bytes) -> int | None:
    return None


def test_take_replayed_closed_ranges() -> None:
    recs = [(s, b"x") for s in (3, 4, 5, 6)]
    got = take_replayed(recs, 0, 4, 6, True, _rank0)
    assert got.batches == [(4, b"x", True), (5, b"x", True)] and got.last == 5
    got = take_replayed([(3, b"x"), (5, b"x")], 0, 3, 6, True, _rank0)  # 4 is gone
    assert got.last is None and got.missing == 2 and got.batches == [(3, b"x", True)]
    got = take_replayed([], 0, 4, 4, True, _rank0)  # nothing to fetch
    assert got.last == 3


def test_take_replayed_buffer_open_and_ranks() -> None:
    recs = [(7, b"r1"), (7, b"r0"), (8, b"r0"), (9, b"bad")]

    def rank_of(p: bytes) -> int | None:
        if p == b"bad":
            raise MalformedFrame("bad", reason="schema")
        return 1 if p == b"r1" else 0

    got = take_replayed(recs, 0, None, 10, True, rank_of)  # from the oldest buffered
    assert got.batches == [(7, b"r0", False), (8, b"r0", True)] and got.last is None
    assert len(got.malformed) == 1 and got.missing == 1  # 9 was malformed: lost
    assert take_replayed(recs[:3], 0, 7, OPEN, False, rank_of).last is None  # no end marker
    assert take_replayed(recs[:3], 0, 7, OPEN, True, rank_of).last == 8


def test_recovery_and_catch_up_plans() -> None:
    streams = {("p", 0): 10, ("p", 1): 4, ("q", 0): 3}
    plan = recovery_plan(streams, {"p": 9, "p#dp1": 1}, lambda h: h != "q")
    assert [(r.stream, r.start, r.stop, r.holder) for r in plan] == [(("p", 1), 2, 4, "p#dp1")]
    plan = recovery_plan(streams, {}, lambda h: True)
    assert sorted(r.holder for r in plan) == ["p", "p#dp1", "q"] and plan[0].start == 0
    assert catch_up_plan({"p#dp2": 4, "q": 0}) == [("p#dp2", ("p", 2), 5), ("q", ("q", 0), 1)]
