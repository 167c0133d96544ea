"""The history between full snapshots, as pure functions on captured `etcdctl watch -w json`
output (tests/captured/watch_json*.txt: etcd 3.5.1, puts, an overwrite, a delete, a key on a
lease, and a txn of two puts and a delete at revision 7)."""

from __future__ import annotations

import base64
import gzip
from pathlib import Path

import pytest

from core.history import (DELETE, PUT, Event, Fold, HistoryError, Recorder, Revision, chain_from, decode_segment,
                          encode_segment, parse_segment_name, parse_watch, revision_at, segment_name)

CAPTURED = Path(__file__).parent / "captured"


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def captured() -> str:
    return (CAPTURED / "watch_json.txt").read_text().strip()


def test_a_watch_line_is_grouped_by_the_revision_that_made_it():
    resp = parse_watch(captured(), at=100.0)
    assert resp.revision == 7 and not resp.compacted
    assert [r.rev for r in resp.revisions] == [2, 3, 4, 5, 6, 7]
    by = {r.rev: r.events for r in resp.revisions}
    assert by[4] == (Event(PUT, b64("a"), b64("3"), 0, 2),)  # an overwrite: prev mod revision 2
    assert by[5] == (Event(DELETE, b64("b"), "", 0, 3),)
    assert by[6][0].lease == 2324035813064006153
    assert [(e.kind, base64.b64decode(e.key)) for e in by[7]] == [(PUT, b"x"), (PUT, b"y"), (DELETE, b"a")]


def test_a_compacted_watch_is_a_gap_not_an_empty_history():
    resp = parse_watch((CAPTURED / "watch_json_compacted.txt").read_text(), at=0)
    assert resp.compacted == 5 and resp.canceled and not resp.revisions
    rec = Recorder(last=1)
    with pytest.raises(HistoryError, match="compacted its history to revision 5 .* revisions 2..5 are lost"):
        rec.take(resp)


def test_the_recorder_continues_the_store_and_refuses_a_gap():
    resp = parse_watch(captured(), at=100.0)
    rec = Recorder(last=1, flush_seconds=10)
    rec.take(resp)
    rec.take(resp)  # re-sent after a reconnect: nothing twice
    assert rec.last == 7 and [r.rev for r in rec.pending] == [2, 3, 4, 5, 6, 7]
    assert not rec.due(105.0) and rec.due(110.0)
    name, data, revs = rec.cut(ttl_of=lambda ids: {i: 600 for i in ids})
    assert parse_segment_name(name).first == 2 and parse_segment_name(name).last == 7
    seg = decode_segment(name, data)
    assert seg.revisions == revs and seg.lease_ttls == {2324035813064006153: 600}
    assert rec.cut() is None
    late = Recorder(last=3)
    with pytest.raises(HistoryError, match="not seen"):
        Recorder(last=0).take(resp)  # revision 1 was never seen
    late.take(resp)
    assert [r.rev for r in late.pending] == [4, 5, 6, 7]


def test_a_segment_read_back_is_checked_against_its_name():
    revs = parse_watch(captured(), at=100.0).revisions
    name, data = encode_segment(list(revs))
    with pytest.raises(HistoryError, match="holds revisions other than its name says"):
        decode_segment(segment_name(2, 9, 100.0), data)
    with pytest.raises(HistoryError, match="damaged"):
        decode_segment(name, data[:-20])
    with pytest.raises(HistoryError, match="damaged"):
        decode_segment(name, gzip.compress(b'{"segment": 1, "leases": {}}\n{"r": 2, "t": 1, "e": [["chmod", 1]]}\n'))
    with pytest.raises(HistoryError, match="followed by 4: 1 missing"):
        encode_segment([revs[0], revs[2]])
    assert parse_segment_name(name + ".age").first == 2  # an encrypted one keeps its name
    assert parse_segment_name("etcd_snapshot_x.db.tar.gz") is None


def test_a_chain_stops_at_the_first_gap_and_skips_overlaps():
    names = [segment_name(a, b, 100.0 + a) for a, b in [(2, 4), (5, 7), (6, 9), (1, 3), (12, 15)]]
    chain = chain_from(3, names)
    assert [(s.first, s.last) for s in chain.segments] == [(2, 4), (5, 7), (6, 9)]
    assert chain.reaches == 9 and chain.gap_after == 10
    assert chain_from(15, names).reaches == 15 and not chain_from(15, names).segments


def test_a_fold_is_the_net_effect_and_refuses_histories_that_do_not_continue():
    revs = parse_watch(captured(), at=100.0).revisions
    fold = Fold(base=1)
    for r in revs:
        fold.add(r)
    assert fold.reached == 7
    assert fold.puts() == {b64("c"): (b64("4"), 2324035813064006153), b64("x"): (b64("10"), 0), b64("y"): (b64("20"), 0)}
    assert fold.deletes() == []  # a and b were made after the base: there is nothing of them to delete
    based = Fold(base=10)
    based.add(Revision(11, 1.0, (Event(DELETE, b64("old"), "", 0, 4), Event(PUT, b64("new"), b64("1"), 0, 0))))
    based.add(Revision(12, 1.0, (Event(DELETE, b64("new"), "", 0, 11),)))
    assert based.deletes() == [b64("old")] and based.puts() == {}
    # A second capture's segment that overlaps (a leader hand-off: gardener/etcd-backup-restore#1043):
    # the same revisions are skipped, not applied twice.
    for r in revs:
        fold.add(r)
    assert fold.reached == 7
    # A segment from another history: key a was deleted at 7, yet this says it was at 4.
    with pytest.raises(HistoryError, match="revision 8: key 'a' was at revision 4 .* do not continue"):
        fold.add(Revision(8, 101.0, (Event(PUT, b64("a"), b64("z"), 0, 4),)))
    with pytest.raises(HistoryError, match="revision 8 is missing before 9"):
        fold.add(Revision(9, 101.0, (Event(PUT, b64("q"), b64("z"), 0, 0),)))


def test_a_point_in_time_is_the_newest_revision_that_had_arrived():
    revs = [Revision(r, 100.0 + r, ()) for r in range(5, 10)]
    assert revision_at(107.5, revs) == 7
    assert revision_at(104.0, revs) is None
    assert revision_at(1e9, revs) == 9


def _history(first: int, last: int, per: int, t0: float = 1000.0) -> tuple[list[str], dict[str, list[Revision]]]:
    """Segments of `per` revisions from `first` to `last`, revision r arriving at t0 + r."""
    names, revs = [], {}
    for a in range(first, last + 1, per):
        rs = [Revision(r, t0 + r, (Event(PUT, b64(f"k{r}"), b64("v"), 0, 0),)) for r in range(a, min(a + per, last + 1))]
        name = segment_name(rs[0].rev, rs[-1].rev, rs[-1].at)
        names.append(name)
        revs[name] = rs
    return names, revs


def test_a_point_plan_picks_the_base_and_the_segments_and_sizes_the_bump_from_the_newest_revision():
    from core.history import BUMP_MARGIN, plan_point

    names, revs = _history(101, 400, 50)
    bases = [("2026-12-02_040000", 100, 1000.0 + 100), ("2026-12-02_050000", 250, 1000.0 + 250)]
    load = revs.__getitem__
    newest = plan_point(bases, names, load)
    assert (newest.base, newest.target, newest.newest) == ("2026-12-02_050000", 400, 400)
    assert newest.bump == BUMP_MARGIN
    at = plan_point(bases, names, load, revision=180)
    assert (at.base_revision, at.target, [s.first for s in at.segments]) == (100, 180, [101, 151])
    assert at.bump == 400 - 180 + BUMP_MARGIN  # above every revision a client may have seen
    assert "behind the newest recorded revision (400) by 220 revisions" in at.lines("revision=180")[2]
    # A point in time: the newest revision that had arrived, read from the segment it falls in.
    assert plan_point(bases, names, load, point=1000.0 + 333.5).target == 333
    assert plan_point(bases, names, load, point=1e9).target == 400
    with pytest.raises(HistoryError, match="before the oldest full snapshot"):
        plan_point(bases, names, load, point=1000.0)
    with pytest.raises(HistoryError, match="older than the oldest full snapshot"):
        plan_point(bases, names, load, revision=50)
    with pytest.raises(HistoryError, match="not both"):
        plan_point(bases, names, load, revision=5, point=5.0)


def test_a_point_past_a_gap_is_refused_naming_it():
    from core.history import plan_point

    names, revs = _history(101, 400, 50)
    names.remove(segment_name(201, 250, 1000.0 + 250))  # lost: 201..250
    bases = [("2026-12-02_040000", 100, 1100.0)]
    with pytest.raises(HistoryError, match=r"revision 300 cannot be reached: .* reaches revision 200; revision 201 is missing"):
        plan_point(bases, names, revs.__getitem__, revision=300)
    assert plan_point(bases, names, revs.__getitem__).target == 200  # the newest reachable
    # A full snapshot after the gap makes the later history reachable again.
    later = bases + [("2026-12-02_050000", 250, 1250.0)]
    assert plan_point(later, names, revs.__getitem__, revision=300).base_revision == 250


def test_a_point_drill_picks_a_revision_the_cluster_still_holds():
    import random

    from flows.verify_point import pick_revision

    rng = random.Random(7)
    for _ in range(50):  # etcd compacted everything below 900: the pick ends above it, in range
        r = pick_revision(100, 1000, lambda rev: rev < 900, rng)
        assert r is not None and 900 <= r <= 1000
    assert pick_revision(100, 1000, lambda rev: True, rng) is None  # all compacted: nothing to compare


def test_a_keyspace_digest_is_of_keys_values_and_leases_not_revisions():
    from core.verify import keyspace_digest

    a = '{"kvs":[{"key":"YQ==","value":"MQ==","mod_revision":5},{"key":"Yg==","value":"Mg==","lease":7}]}'
    b = '{"kvs":[{"key":"Yg==","value":"Mg==","lease":7,"mod_revision":9},{"key":"YQ==","value":"MQ=="}]}'
    assert keyspace_digest(a) == keyspace_digest(b) and keyspace_digest(a)[1] == 2
    assert keyspace_digest(a) != keyspace_digest(b.replace('"lease":7', '"lease":8'))
    assert keyspace_digest(a) != keyspace_digest(a.replace("MQ==", "Mw=="))
    assert keyspace_digest("{}") == keyspace_digest('{"kvs":[]}')


def _key():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from core.signing import public_line

    k = Ed25519PrivateKey.generate()
    return k, public_line(k)


def test_a_segment_is_signed_over_its_name_and_lines_and_refused_when_anything_differs():
    from core.signing import seal_segment, segment_problem

    key, trusted = _key()
    other, stranger = _key()
    revs = list(parse_watch(captured(), at=100.0).revisions)
    name, data = encode_segment(revs, {}, seal_segment(key))
    check = lambda trust: (lambda n, d, t: segment_problem(n, d, t, trust))  # noqa: E731
    assert decode_segment(name, data, check([trusted])).unsigned is None
    assert decode_segment(name + ".age", data, check([trusted])).revisions == revs  # the plain name is what is signed
    with pytest.raises(HistoryError, match="not one of the inventory's backup_signers"):
        decode_segment(name, data, check([stranger]))
    # Another segment's signature does not pass for this one: the name is signed too.
    later = segment_name(revs[0].rev, revs[-1].rev, revs[-1].at + 60)
    with pytest.raises(HistoryError, match="does not match"):
        decode_segment(later, data, check([trusted]))
    # Lines changed and the digest recomputed: the signature no longer matches.
    text = gzip.decompress(data).decode()
    *body, last = text.splitlines(keepends=True)
    import hashlib
    import json

    forged_body = "".join(body).replace(b64("3"), b64("9"))
    trailer = json.loads(last)
    trailer["sha256"] = hashlib.sha256(forged_body.encode()).hexdigest()
    forged = gzip.compress((forged_body + json.dumps(trailer) + "\n").encode())
    with pytest.raises(HistoryError, match="does not match: it was changed after signing"):
        decode_segment(name, forged, check([trusted]))
    # Unsigned: refused unless the operator accepts it, and then said.
    name2, plain = encode_segment(revs, {})
    with pytest.raises(HistoryError, match="it is unsigned.*allow_unsigned=true"):
        decode_segment(name2, plain, check([trusted]))
    assert decode_segment(name2, plain, check([trusted]), allow_unsigned=True).unsigned == "it is unsigned"


def test_a_segment_cut_short_or_damaged_is_refused():
    revs = list(parse_watch(captured(), at=100.0).revisions)
    name, data = encode_segment(revs, {})
    text = gzip.decompress(data).decode()
    cut = gzip.compress("".join(text.splitlines(keepends=True)[:-1]).encode())  # the last line lost
    with pytest.raises(HistoryError, match="damaged"):
        decode_segment(name, cut)
    changed = gzip.compress(text.replace(b64("3"), b64("9")).encode())  # the digest no longer matches
    with pytest.raises(HistoryError, match="do not match the digest"):
        decode_segment(name, changed)
    with pytest.raises(HistoryError, match="damaged"):
        decode_segment(name, data[: len(data) // 2])


def test_where_a_capture_starts_and_when_it_refuses():
    from core.history import start_revision

    assert start_revision(120, [100, 50], 500) == 120  # after the newest segment
    assert start_revision(None, [100, 50], 500) == 100  # else after the newest full snapshot
    assert start_revision(None, [], 500) is None  # neither: a full snapshot first
    with pytest.raises(HistoryError, match="the cluster is at 90: it is another cluster's history"):
        start_revision(120, [100], 90)


def test_segments_go_with_the_sets_retention_deleted():
    from core.history import expired_segments

    old = segment_name(10, 20, 1000.0)
    new = segment_name(21, 30, 3000.0)
    assert expired_segments([old, new, "nova-dr-manifest_x.json"], 2000.0) == [old]
    assert expired_segments([old + ".age", new], 2000.0) == [old + ".age"]
    assert expired_segments([old, new], None) == []  # no set kept: nothing is decided for the person


def test_a_point_in_time_is_read_with_its_zone_or_refused():
    from core.errors import NovaDRError
    from tasks.point import parse_point

    assert parse_point("2026-12-02T10:15:30Z") == parse_point("2026-12-02T13:15:30+03:00") == 1796206530.0
    with pytest.raises(NovaDRError, match="give its zone"):
        parse_point("2026-12-02T10:15:30")
    with pytest.raises(NovaDRError, match="not a time"):
        parse_point("yesterday")


def test_a_history_folded_in_parallel_chunks_is_the_history_folded_in_order(tmp_path):
    """fold_history's chunks (worker processes, merged at each seam) against one fold of the
    same revisions, on a history with overwrites, deletes, re-creations and an overlap."""
    import random

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from core.history import PointPlan, parse_segment_name
    from core.signing import public_line, seal_segment
    from tasks import point
    from tasks.history_store import HistoryStore
    from tasks.storage import DirectoryStore

    key = Ed25519PrivateKey.generate()
    r, last, rev, allrevs = random.Random(3), {}, 100, []
    for _ in range(30):
        revs = []
        for _ in range(200):
            rev += 1
            k = b64(f"/k/{r.randrange(40)}")
            prev = last.get(k, 0)
            if prev and r.random() < 0.2:
                ev, last[k] = Event(DELETE, k, "", 0, prev), 0
            else:
                ev, last[k] = Event(PUT, k, b64(str(rev)), 0, prev), rev
            revs.append(Revision(rev, float(rev), (ev,)))
        allrevs += revs
        name, data = encode_segment(revs, {}, seal_segment(key))
        (tmp_path / name).write_bytes(data)
    overlap, data = encode_segment(allrevs[1000:1300], {}, seal_segment(key))  # a second capture's
    (tmp_path / overlap).write_bytes(data)
    names = sorted(p.name for p in tmp_path.iterdir())
    target = rev - 150
    chain = chain_from(100, names)
    plan = PointPlan("base", 100, target, tuple(s for s in chain.segments if s.first <= target), rev, 0)
    history = HistoryStore(DirectoryStore(tmp_path), [public_line(key)])
    # chunk_bytes=1: a chunk per segment, so every seam is merged
    fold, _, warnings, at = point.fold_history(history, plan, 100, [public_line(key)], False, chunk_bytes=1)
    one = Fold(100)
    for rv in allrevs:
        if rv.rev <= target:
            one.add(rv)
    assert (fold.reached, fold.puts(), sorted(fold.deletes())) == (target, one.puts(), sorted(one.deletes()))
    assert at == float(target) and not warnings and len(plan.segments) > point.IN_PROCESS
    assert parse_segment_name(overlap) in plan.segments  # the overlap was folded too, and skipped


def test_folds_merged_at_a_seam_are_checked_as_one_fold():
    a, b = Fold(10), Fold(12)
    a.add(Revision(11, 1.0, (Event(PUT, b64("k"), b64("1"), 0, 5),)))
    a.add(Revision(12, 1.0, (Event(PUT, b64("j"), b64("1"), 0, 0),)))
    b.add(Revision(13, 1.0, (Event(PUT, b64("k"), b64("2"), 0, 11), Event(DELETE, b64("old"), "", 0, 3))))
    a.merge(b)
    assert a.reached == 13 and a.puts() == {b64("k"): (b64("2"), 0), b64("j"): (b64("1"), 0)}
    assert a.deletes() == [b64("old")]
    other = Fold(13)
    other.add(Revision(14, 1.0, (Event(PUT, b64("k"), b64("3"), 0, 7),)))  # k was at 13, not 7
    with pytest.raises(HistoryError, match="revision 14 or after: key 'k' was at revision 7 .* do not continue"):
        a.merge(other)
    with pytest.raises(HistoryError, match="revision 14 is missing before 16"):
        a.merge(Fold(15))
