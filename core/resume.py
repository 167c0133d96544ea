"""What a re-run of a recovery will skip, and whether the cluster still agrees with it.

Checkpoints are the steps an earlier run of the same recovery id finished. A re-run skips
them; the plan at the gate lists them, and refuses where the masters contradict one: a
member an earlier run stopped, whose data nothing has touched since, that runs again (an
operator repaired the cluster by hand in between). Pure: checkpoints and facts in, words out.
"""

from __future__ import annotations

from core.facts import ClusterFacts
from core.plan import Plan


def resume_notes(plan: Plan, done: dict[str, str], facts: ClusterFacts) -> tuple[str, list[str]]:
    """`done`: step id -> when an earlier run finished it (UTC). Returns the plan's line about
    the resume ("" for a fresh start) and the contradictions that must refuse it."""
    skipped = [s for s in plan.steps if s.id in done]
    if not skipped:
        return "", []
    running = {f.member for f in facts.masters if f.reachable and (f.service == "active" or f.healthy)}
    refusals = []
    for s in skipped:
        if s.action != "stop_etcd" or s.master not in running:
            continue
        # Once a later step on that master finished, a running etcd is what the plan expects.
        after = [t.id for t in plan.steps if t.master == s.master and s.id in t.deps]
        if not any(t in done for t in after):
            refusals.append(f"{s.id}: an earlier run of this recovery stopped etcd on {s.master} ({done[s.id]}), "
                            f"and it runs again now")
    line = (f"Resuming recovery {plan.recovery_id}: {len(skipped)} step(s) an earlier run finished are skipped: "
            + ", ".join(f"{s.id} ({done[s.id]})" for s in skipped))
    return line, refusals
