"""A recovery plan: a DAG of steps, shown before anything runs, executed in dependency order.

Building a plan is pure (facts + parameters in, steps out); executing it is the flow's job.
"""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field


def size_text(n: int) -> str:
    """Bytes as plans and reports show them: 20.0 MiB, 1.2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class Step(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str = Field(description="unique, stable across re-runs: the checkpoint key")
    action: str = Field(description="what the executor calls")
    master: str | None = Field(None, description="etcd member it runs on; None for cluster-wide steps")
    title: str
    command: str = Field("", description="the exact command, for the operator to read")
    deps: tuple[str, ...] = ()
    destructive: bool = False
    args: dict = Field(default_factory=dict)


class Plan(BaseModel):
    model_config = ConfigDict(frozen=True)

    flow: str
    cluster: str
    recovery_id: str
    steps: tuple[Step, ...]
    warnings: tuple[str, ...] = ()
    summary: str = ""

    def model_post_init(self, _ctx) -> None:
        ids = [s.id for s in self.steps]
        if len(set(ids)) != len(ids):
            raise ValueError(f"plan has duplicate step ids: {ids}")
        known: set[str] = set()
        for s in self.steps:  # steps are listed in a topological order
            missing = [d for d in s.deps if d not in known]
            if missing:
                raise ValueError(f"step {s.id} depends on {missing}, which are not before it")
            known.add(s.id)

    @property
    def destructive(self) -> bool:
        return any(s.destructive for s in self.steps)

    def fingerprint(self) -> str:
        """Changes whenever what would run changes: compared before and after approval."""
        body = [(s.id, s.action, s.master, s.command, s.deps, sorted(s.args.items())) for s in self.steps]
        return hashlib.sha256(json.dumps(body, default=str).encode()).hexdigest()[:16]

    def waves(self) -> list[list[Step]]:
        """Steps grouped so that each wave depends only on earlier ones (for display)."""
        level: dict[str, int] = {}
        for s in self.steps:
            level[s.id] = 1 + max((level[d] for d in s.deps), default=-1)
        out: list[list[Step]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
        for s in self.steps:
            out[level[s.id]].append(s)
        return out

    def markdown(self) -> str:
        lines = [f"# Plan: {self.flow} on cluster `{self.cluster}`", "",
                 f"Recovery id: `{self.recovery_id}` (re-run with `--param recovery_id={self.recovery_id}` to resume)", ""]
        if self.summary:
            lines += [self.summary, ""]
        for w in self.warnings:
            lines.append(f"> **Warning:** {w}")
        if self.warnings:
            lines.append("")
        lines += ["| # | step | on | what | command | after |", "|---|---|---|---|---|---|"]
        for i, s in enumerate(self.steps, 1):
            mark = " **(destructive)**" if s.destructive else ""
            cmd = s.command.replace("|", "\\|")
            lines.append(f"| {i} | `{s.id}` | {s.master or 'cluster'} | {s.title}{mark} | `{cmd}` | "
                         f"{', '.join(s.deps) or '-'} |")
        lines += ["", "```mermaid", "graph TD"]
        ids = {s.id: f"s{i}" for i, s in enumerate(self.steps)}
        for s in self.steps:
            lines.append(f'  {ids[s.id]}["{s.id}"]')
            for d in s.deps:
                lines.append(f"  {ids[d]} --> {ids[s.id]}")
        lines.append("```")
        return "\n".join(lines)

    def text(self) -> str:
        """The plan for a terminal."""
        out = [f"Plan: {self.flow} on cluster {self.cluster} (recovery id {self.recovery_id})"]
        if self.summary:
            out.append(self.summary)
        out += [f"WARNING: {w}" for w in self.warnings]
        for n, wave in enumerate(self.waves(), 1):
            out.append(f"  wave {n}:")
            for s in wave:
                mark = "  [destructive]" if s.destructive else ""
                out.append(f"    {s.id:34} {s.title}{mark}")
                if s.command:
                    out.append(f"    {'':34} $ {s.command}")
        return "\n".join(out)
