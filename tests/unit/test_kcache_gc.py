"""Garbage collection of the node's store: the plan's rules, on generated entries too."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from gpufleet.kcache.gc import NOT_WANTED, OVER_BUDGET, GcPlan, plan_gc
from gpufleet.kcache.store import CacheUsage, StoredCache

A = "sha256:" + "aa" * 32
B = "sha256:" + "bb" * 32
C = "sha256:" + "cc" * 32
D = "sha256:" + "dd" * 32


def entry(digest: str, root: str = "/cache", *, size: int = 100, used: float = 0.0) -> CacheUsage:
    return CacheUsage(
        StoredCache(digest, root, Path("/store") / digest[7:9] / root[1:]), size, used
    )


def removed(plan: GcPlan) -> list[tuple[str, str, str]]:
    return [(r.cache.digest, r.cache.mount_root, r.reason) for r in plan.removals]


def test_nothing_is_removed_when_every_digest_is_wanted_and_no_budget_is_set() -> None:
    plan = plan_gc([entry(A), entry(B)], wanted={A, B}, in_use=set(), max_bytes=None)

    assert plan.removals == ()
    assert (plan.total_bytes, plan.kept_bytes, plan.over_budget) == (200, 200, False)


def test_a_digest_no_cache_wants_and_no_pod_mounts_is_removed() -> None:
    plan = plan_gc([entry(A), entry(B)], wanted={A}, in_use=set(), max_bytes=None)

    assert removed(plan) == [(B, "/cache", NOT_WANTED)]
    assert plan.kept_bytes == 100


def test_every_mount_root_of_an_unwanted_digest_goes() -> None:
    entries = [entry(A), entry(A, "/kernels"), entry(A, "/opt/k"), entry(B)]

    plan = plan_gc(entries, wanted={B}, in_use=set(), max_bytes=None)

    assert removed(plan) == [
        (A, "/cache", NOT_WANTED),
        (A, "/kernels", NOT_WANTED),
        (A, "/opt/k", NOT_WANTED),
    ]


def test_an_unwanted_digest_a_pod_mounts_is_kept_but_its_unmounted_roots_go() -> None:
    entries = [entry(A), entry(A, "/kernels")]

    plan = plan_gc(entries, wanted=set(), in_use={(A, "/kernels")}, max_bytes=None)

    assert removed(plan) == [(A, "/cache", NOT_WANTED)]
    assert (plan.kept_bytes, plan.in_use_bytes) == (100, 100)


def test_a_budget_evicts_the_least_recently_used_unmounted_entries_until_under_it() -> None:
    entries = [entry(A, used=30), entry(B, used=10), entry(C, used=20), entry(D, used=40)]

    plan = plan_gc(entries, wanted={A, B, C, D}, in_use=set(), max_bytes=250)

    assert removed(plan) == [(B, "/cache", OVER_BUDGET), (C, "/cache", OVER_BUDGET)]
    assert plan.kept_bytes == 200
    assert not plan.over_budget


def test_a_total_exactly_at_the_budget_evicts_nothing() -> None:
    plan = plan_gc([entry(A), entry(B)], wanted={A, B}, in_use=set(), max_bytes=200)

    assert plan.removals == ()


def test_a_budget_never_evicts_a_mounted_entry_however_old() -> None:
    entries = [entry(A, used=1), entry(B, used=50), entry(C, used=60)]

    plan = plan_gc(entries, wanted={A, B, C}, in_use={(A, "/cache")}, max_bytes=150)

    assert removed(plan) == [(B, "/cache", OVER_BUDGET), (C, "/cache", OVER_BUDGET)]
    assert plan.kept_bytes == 100


def test_unwanted_entries_go_before_any_wanted_one_is_evicted() -> None:
    entries = [entry(A, used=1), entry(B, used=99), entry(C, used=50)]

    plan = plan_gc(entries, wanted={A, C}, in_use=set(), max_bytes=150)

    assert removed(plan) == [(B, "/cache", NOT_WANTED), (A, "/cache", OVER_BUDGET)]


def test_when_mounted_entries_alone_exceed_the_budget_nothing_more_goes_and_it_says_so() -> None:
    entries = [entry(A, size=300), entry(B, size=50), entry(C, size=70)]

    plan = plan_gc(entries, wanted={A, B}, in_use={(A, "/cache")}, max_bytes=200)

    assert removed(plan) == [(C, "/cache", NOT_WANTED)]
    assert plan.over_budget
    assert (plan.in_use_bytes, plan.kept_bytes, plan.max_bytes) == (300, 350, 200)


def test_ties_in_last_use_are_broken_by_digest_then_mount_root() -> None:
    entries = [entry(B, used=5), entry(A, "/z", used=5), entry(A, "/b", used=5), entry(C, used=9)]

    plan = plan_gc(list(reversed(entries)), wanted={A, B, C}, in_use=set(), max_bytes=150)

    assert removed(plan) == [
        (A, "/b", OVER_BUDGET),
        (A, "/z", OVER_BUDGET),
        (B, "/cache", OVER_BUDGET),
    ]


def test_unwanted_entries_are_listed_in_least_recently_used_order() -> None:
    entries = [entry(A, used=3), entry(B, used=1), entry(C, used=2)]

    plan = plan_gc(entries, wanted=set(), in_use=set(), max_bytes=None)

    assert [r.cache.digest for r in plan.removals] == [B, C, A]


def test_the_plan_gives_each_removal_its_reason_and_size() -> None:
    plan = plan_gc(
        [entry(A, size=7, used=1), entry(B, size=9)], wanted={A}, in_use=set(), max_bytes=0
    )

    assert plan.reasons == {
        entry(B).cache: NOT_WANTED,
        entry(A).cache: OVER_BUDGET,
    }
    assert [r.size_bytes for r in plan.removals] == [9, 7]
    assert plan.remove == (entry(B).cache, entry(A).cache)


def test_the_same_entry_listed_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        plan_gc([entry(A), entry(A)], wanted=set(), in_use=set(), max_bytes=None)


def test_a_negative_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        plan_gc([entry(A)], wanted=set(), in_use=set(), max_bytes=-1)


@pytest.mark.parametrize("seed", range(300))
def test_generated_stores_keep_every_rule(seed: int) -> None:
    rng = random.Random(seed)
    digests = [f"sha256:{rng.getrandbits(256):064x}" for _ in range(rng.randint(0, 8))]
    roots = ["/cache", "/kernels", "/opt/triton", "/a/b"]
    keys = {(d, r) for d in digests for r in roots if rng.random() < 0.5}
    entries = [
        entry(d, r, size=rng.choice([0, 1, 10, 1000, rng.randint(0, 5000)]), used=rng.randint(0, 5))
        for d, r in sorted(keys)
    ]
    rng.shuffle(entries)
    wanted = {d for d in digests if rng.random() < 0.5} | {"sha256:" + "ee" * 32}
    in_use = {k for k in keys if rng.random() < 0.2} | {("sha256:" + "ff" * 32, "/cache")}
    total = sum(e.size_bytes for e in entries)
    max_bytes = rng.choice(
        [None, 0, total // 3, total // 2, total, total + 1, rng.randint(0, 9000)]
    )

    plan = plan_gc(entries, wanted=wanted, in_use=in_use, max_bytes=max_bytes)
    again = plan_gc(list(reversed(entries)), wanted=wanted, in_use=in_use, max_bytes=max_bytes)

    gone = {(r.cache.digest, r.cache.mount_root) for r in plan.removals}
    kept = [e for e in entries if (e.cache.digest, e.cache.mount_root) not in gone]
    mounted = sum(e.size_bytes for e in entries if (e.cache.digest, e.cache.mount_root) in in_use)
    assert plan == again  # the order of the input plays no part
    assert len(gone) == len(plan.removals)
    assert not gone & in_use  # never a mounted entry
    for e in kept:  # an unwanted digest stays only where a pod mounts it
        assert e.cache.digest in wanted or (e.cache.digest, e.cache.mount_root) in in_use
    assert plan.kept_bytes == sum(e.size_bytes for e in kept)
    assert plan.in_use_bytes == mounted
    if max_bytes is None:
        assert all(r.reason == NOT_WANTED for r in plan.removals)
    elif mounted <= max_bytes:
        assert plan.kept_bytes <= max_bytes
        assert not plan.over_budget
        # LRU and no more than needed: putting back the last eviction breaks the budget.
        evicted = [r for r in plan.removals if r.reason == OVER_BUDGET]
        if evicted:
            assert plan.kept_bytes + evicted[-1].size_bytes > max_bytes
            oldest_kept = min(
                (e.last_used for e in kept if (e.cache.digest, e.cache.mount_root) not in in_use),
                default=None,
            )
            newest = max(r.last_used for r in evicted)
            assert oldest_kept is None or oldest_kept >= newest
    else:
        assert plan.over_budget
        assert all(r.reason == NOT_WANTED for r in plan.removals)
