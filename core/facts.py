"""What the preflight learned about each master: a typed, read-only picture of the cluster."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from core.etcd import EndpointStatus, MemberInfo


class MasterFacts(BaseModel):
    model_config = ConfigDict(frozen=True)

    member: str
    node: str
    reachable: bool = True
    error: str = ""  # why it is unreachable
    service: str = "unknown"  # active | inactive | failed | activating | unknown
    healthy: bool = False
    status: EndpointStatus | None = None
    members: tuple[MemberInfo, ...] | None = None  # `member list` as this master sees it
    initial_cluster_state: str = ""
    data_dir_exists: bool = False
    data_dir_has_member: bool = False
    data_dir_mount_point: bool = False
    data_dir_bytes: int = 0
    free_bytes: int | None = 0  # None: df did not answer (a full restore refuses then)
    manifest: str = ""  # present | parked | absent | "" (none configured)
    entries: tuple[str, ...] = ()  # nova-dr-* work and quarantine dirs in the data dir
    mismatches: tuple[str, ...] = ()  # where the inventory and the master's env file disagree


def parse_probe(text: str) -> dict:
    """The `key=value` lines of the data-dir probe script (tasks/etcd.py)."""
    out: dict = {"entries": []}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key == "entry":
            out["entries"].append(value)
        elif key in ("exists", "member", "mount_point"):
            out[key] = value.strip() == "1"
        elif key == "bytes":
            out[key] = int(value.strip() or 0)  # du prints nothing for a missing member dir
        elif key == "free":
            # None when df printed nothing usable: unknown free space is never "enough".
            out[key] = int(value.strip()) if value.strip().isdigit() else None
        elif key == "manifest":
            out[key] = value.strip()
    return out


class ClusterFacts(BaseModel):
    model_config = ConfigDict(frozen=True)

    masters: tuple[MasterFacts, ...]

    def by_member(self, member: str) -> MasterFacts:
        return next(f for f in self.masters if f.member == member)

    @property
    def healthy(self) -> list[str]:
        return [f.member for f in self.masters if f.healthy]

    @property
    def unhealthy(self) -> list[str]:
        return [f.member for f in self.masters if not f.healthy]

    @property
    def unreachable(self) -> list[str]:
        return [f.member for f in self.masters if not f.reachable]

    @property
    def leader(self) -> str | None:
        for f in self.masters:
            if f.healthy and f.status and f.status.is_leader:
                return f.member
        return None

    def member_list(self) -> tuple[MemberInfo, ...] | None:
        """The member list from a healthy master (the cluster's own view), if any answered."""
        for f in self.masters:
            if f.healthy and f.members is not None:
                return f.members
        return None

    @property
    def voting_members(self) -> int:
        ml = self.member_list()
        return len([m for m in ml if not m.is_learner]) if ml is not None else len(self.masters)

    @property
    def has_quorum(self) -> bool:
        return len(self.healthy) > self.voting_members // 2
