"""Reading backup sets from file names, and retention: pure functions."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from core.errors import NovaDRError
from core.settings import resolve_settings
from core.sets import StoredFile, choose_set, expired, read_sets, spare_locked

NODES = ["nova-master-1-nova-internal", "nova-master-2-nova-internal", "nova-master-3-nova-internal"]


def ours(ts: str, nodes=NODES, starvault=True, manifest=True, word="kubereresources") -> list[str]:
    out = [f"etcd_snapshot_nova-v6.0.1_k8s-v1.27.11_{ts}.db.tar.gz"] + [f"{n}_{word}_{ts}.tar.gz" for n in nodes]
    if starvault:
        out.append(f"starvault_snapshot_nova-v6.0.1_{ts}.db")
    if manifest:
        out.append(f"nova-dr-manifest_{ts}.json")
    return out


def files(names) -> list[StoredFile]:
    return [StoredFile(n, 100) for n in names]


def test_a_daemon_style_set_is_one_complete_unverified_set():
    names = [
        "etcd_snapshot_nova-v6.0.1_k8s-v1.27.11_2024-03-01_050535.db.tar.gz",
        "starvault_snapshot_nova-v6.0.1_2024-03-01_0505351.db",  # the seed's stray 1
        "nova-master-1-nova-internal_kuberestores_2024-03-01_050535.tar.gz",
        "nova-master-2-nova-internal_kubereresources_2024-03-01_050556.tar.gz",
        "nova-master-3-nova-internal_kuberesources_2024-03-01_050616.tar.gz",
        "README.txt",
    ]
    sets, orphans = read_sets(files(names))
    assert len(sets) == 1 and orphans == []
    s = sets[0]
    assert s.complete(NODES) and s.manifest is None and s.nova_version == "6.0.1"
    assert set(s.nodes) == set(NODES) and s.starvault


def test_window_splits_sets_and_manifest_needs_the_exact_time():
    names = ours("2024-03-01_040000") + ours("2024-03-02_040000", manifest=False)
    names.append("nova-dr-manifest_2024-03-02_040100.json")  # not this run's: no set
    sets, orphans = read_sets(files(names))
    assert [s.ts for s in sets] == ["2024-03-02_040000", "2024-03-01_040000"]
    assert sets[0].manifest is None and sets[1].manifest and orphans == ["nova-dr-manifest_2024-03-02_040100.json"]
    assert sets[0].missing(NODES) == [] and read_sets(files(ours("2024-03-03_000000", starvault=False)))[0][0].missing(
        NODES) == ["StarVault snapshot"]


def test_choose_set_latest_skips_incomplete_sets():
    names = ours("2024-03-01_040000") + ours("2024-03-02_040000", nodes=NODES[:2])
    sets, _ = read_sets(files(names))
    assert choose_set(sets, "latest", NODES, True).ts == "2024-03-01_040000"
    assert choose_set(sets, "2024-03-02_040000", NODES, True).ts == "2024-03-02_040000"
    with pytest.raises(NovaDRError, match="no backup set '2020-01-01_000000'"):
        choose_set(sets, "2020-01-01_000000", NODES, True)
    with pytest.raises(NovaDRError, match="no complete backup set.*missing archive of nova-master-3"):
        choose_set(sets[:1], "latest", NODES, True)


NOW = datetime(2024, 3, 20, 5, 0, tzinfo=timezone.utc)


def test_retention_deletes_old_sets_but_keeps_the_newest_complete_and_foreign_files():
    names = ours("2024-03-01_040000") + ours("2024-03-05_040000") + ours("2024-03-19_040000") + ["notes.txt"]
    sets, _ = read_sets(files(names))
    doomed, _ = expired(sets, NOW, 7, NODES, True)
    assert set(doomed) == set(ours("2024-03-01_040000") + ours("2024-03-05_040000"))
    assert "notes.txt" not in doomed


def test_retention_keeps_an_old_newest_complete_set_and_ignores_incomplete_newer_ones():
    names = ours("2024-03-01_040000") + ours("2024-03-02_040000") + ours("2024-03-19_040000", nodes=NODES[:1])
    sets, _ = read_sets(files(names))
    doomed, why = expired(sets, NOW, 7, NODES, True)
    assert set(doomed) == set(ours("2024-03-01_040000"))  # 03-02 is the newest complete: kept
    assert "2024-03-02_040000" in why


def test_a_set_dated_in_the_future_is_never_latest_never_expired_and_named():
    """Planted (or from a wrong clock), it once switched retention off for good, and became
    `latest` for every reader. Now it is left aside, named; retention goes on without it."""
    names = ours("2024-03-01_040000") + ours("2024-03-19_040000") + ours("2030-01-01_040000")
    sets, _ = read_sets(files(names))
    doomed, why = expired(sets, NOW, 7, NODES, True)
    assert set(doomed) == set(ours("2024-03-01_040000"))  # the 12-day-old set goes, as without it
    assert "kept the newest complete set 2024-03-19_040000" in why
    assert "dated in the future by this machine's clock (UTC): 2030-01-01_040000 (" in why and "planted" in why
    assert choose_set(sets, "latest", NODES, True, NOW).ts == "2024-03-19_040000"
    assert choose_set(sets, "2030-01-01_040000", NODES, True, NOW).ts == "2030-01-01_040000"  # by name: yes
    only_ahead, _ = read_sets(files(ours("2030-01-01_040000")))
    with pytest.raises(NovaDRError, match="no complete backup set.*2030-01-01_040000 .*h ahead"):
        choose_set(only_ahead, "latest", NODES, True, NOW)
    assert expired(only_ahead, NOW, 7, NODES, True)[0] == []


def test_a_clock_running_ahead_does_not_expire_sets_early():
    """The orchestrator's clock is 3 days ahead; the store wrote tonight's set at its real time.
    Retention then counts from the store's clock: the 03-15 set (5 days old) stays."""
    from core.sets import retention_clock

    real = datetime(2024, 3, 20, 4, 0, tzinfo=timezone.utc)
    names = ours("2024-03-10_040000") + ours("2024-03-15_040000") + ours("2024-03-20_040000")
    stored = [StoredFile(n, 100, real.timestamp() if "03-20" in n else 0.0) for n in names]
    ahead = datetime(2024, 3, 23, 4, 5, tzinfo=timezone.utc)
    now, clock = retention_clock(ahead, stored)
    assert now == real and "the store's clock" in clock and "72.1h before this machine's clock" in clock
    doomed, _ = expired(read_sets(stored)[0], now, 7, NODES, True)
    assert set(doomed) == set(ours("2024-03-10_040000"))  # with this machine's clock, 03-15 would go too
    assert set(expired(read_sets(stored)[0], ahead, 7, NODES, True)[0]) >= set(ours("2024-03-15_040000"))
    # Clocks that agree: this machine's.
    assert retention_clock(real, stored) == (real, "this machine's clock (UTC)")


def test_settings_parameter_then_environment_then_default():
    s = resolve_settings({"INCLUDE_PKI_DATA": False}, {"INCLUDE_PKI_DATA": "true", "RETENTION_PERIOD_DAYS": "3",
                                                       "INCLUDE_STARVAULT_DB_BACKUP": "no"})
    assert s == {"INCLUDE_STARVAULT_UNSEAL_TOKENS": True, "INCLUDE_PKI_DATA": False,
                 "INCLUDE_DATA_ENCRYPTION_CONFIG": True, "INCLUDE_STARVAULT_DB_BACKUP": False,
                 "RETENTION_PERIOD_DAYS": 3}
    with pytest.raises(NovaDRError, match="INCLUDE_PKI_DATA='maybe' \\(environment\\): write true or false"):
        resolve_settings({}, {"INCLUDE_PKI_DATA": "maybe"})
    with pytest.raises(NovaDRError, match="RETENTION_PERIOD_DAYS='0'"):
        resolve_settings({}, {"RETENTION_PERIOD_DAYS": "0"})


def test_a_set_from_the_future_is_not_fresh():
    from flows.verify import check_freshness

    sets, _ = read_sets(files(ours("2024-03-21_040000")))  # 23 h after NOW
    c = check_freshness(sets, NODES, True, 26, NOW)
    assert c.status == "fail" and "2024-03-21_040000 (23.0h ahead)" in c.evidence, c
    sets, _ = read_sets(files(ours("2024-03-19_040000")))
    c = check_freshness(sets, NODES, True, 26, NOW)
    assert c.status == "pass" and "25.0h old by this machine's clock (UTC" in c.evidence, c
    sets, _ = read_sets(files(ours("2024-03-19_040000") + ours("2024-03-21_040000")))  # one planted beside it
    c = check_freshness(sets, NODES, True, 26, NOW)
    assert c.status == "warn" and "2024-03-19_040000 is 25.0h old" in c.evidence and "23.0h ahead" in c.evidence


def test_retention_keeps_a_set_whole_while_any_of_its_files_is_locked():
    names = ours("2024-03-01_040000") + ours("2024-03-02_040000") + ours("2024-03-19_040000")
    sets, _ = read_sets(files(names))
    doomed, _ = expired(sets, NOW, 7, NODES, True)
    one = next(f for f in ours("2024-03-01_040000") if f.startswith("nova-master-2"))
    locks = {one: datetime(2024, 3, 21, tzinfo=timezone.utc),  # still locked: its whole set stays
             ours("2024-03-02_040000")[0]: datetime(2024, 3, 19, tzinfo=timezone.utc)}  # expired: goes
    left, note = spare_locked(sets, doomed, locks, NOW)
    assert set(left) == set(ours("2024-03-02_040000"))
    assert note == "; locked, kept until their lock expires: 2024-03-01_040000 (until 2024-03-21 00:00 UTC)"
    assert spare_locked(sets, doomed, {}, NOW) == (doomed, "")
