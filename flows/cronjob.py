"""install-cronjob-backup (SPEC P1): install the platform's CronJob backups the platform's way,
a Flux Kustomization, and check on demand how the last run went.

install: preflight (read-only) -> plan with the rendered object -> gate -> server-side apply
-> wait until Flux reports Ready on this generation -> show the CronJob.
check:   the newest Job of the CronJob, each backup pod Completed/Error, and the newest set
in the store when one is given."""

from __future__ import annotations

import yaml
from prefect import flow, get_run_logger

from blocks.kube import resolve_kube
from core import kube as k
from core.errors import NovaDRError
from core.plan import Plan, Step
from core.sets import read_sets
from core.settings import resolve_settings
from flows import machinery as mc
from tasks.kube import Kube, KubeError, wait_for
from tasks.storage import open_store

FLOW_NAME = "install-cronjob-backup"


def plan_install(obj: dict, current: dict | None, host: str) -> Plan:
    meta = obj["metadata"]
    change = "create" if current is None else f"update (now generation {current['metadata'].get('generation')})"
    where = f"{meta['namespace']}/{meta['name']}"
    steps = (
        Step(id="apply-kustomization", action="apply", title=f"{change} Kustomization {where}",
             command=f"server-side apply kustomize.toolkit.fluxcd.io/v1 Kustomization {where} "
                     f"(field manager {k.FIELD_MANAGER})", destructive=current is not None),
        Step(id="wait-ready", action="wait", title="wait until Flux reports Ready on the new generation",
             deps=("apply-kustomization",)),
        Step(id="show-cronjob", action="show", title=f"read CronJob {k.BACKUP_NS}/{k.CRONJOB}", deps=("wait-ready",)),
    )
    summary = f"Kubernetes API: {host}\n\n```yaml\n{yaml.safe_dump(obj, sort_keys=False)}```"
    return Plan(flow=FLOW_NAME, cluster=host, recovery_id=mc.slug(f"{FLOW_NAME}-{meta['name']}"), steps=steps,
                summary=summary)


@flow(name=FLOW_NAME)
def install_cronjob_backup(
    kube: str | None = None,
    mode: str = "install",
    masters: int = 3,
    path: str | None = None,
    source_kind: str = "GitRepository",
    source_name: str = "nova-platform",
    source_namespace: str = k.GITOPS_NS,
    schedule: str = "0 4 * * *",
    nfs_server: str | None = None,
    nfs_path: str | None = None,
    volume: dict | None = None,
    INCLUDE_STARVAULT_UNSEAL_TOKENS: bool | None = None,
    INCLUDE_PKI_DATA: bool | None = None,
    INCLUDE_DATA_ENCRYPTION_CONFIG: bool | None = None,
    INCLUDE_STARVAULT_DB_BACKUP: bool | None = None,
    RETENTION_PERIOD_DAYS: int | None = None,
    store: str | None = None,
    s3_block: str | None = None,
    force: bool = False,
    auto_approve: bool = False,
    approval_timeout_minutes: float = 60,
    timeout_minutes: float = 10,
    poll_seconds: float = 2.0,
) -> dict:
    """mode=install renders, applies and waits; mode=check reports the last run. kube:
    block:NAME, in-cluster, or a kubeconfig path (default $NOVA_DR_KUBE, ~/.kube/config)."""
    if mode not in ("install", "check"):
        raise NovaDRError(f"mode={mode!r}: write install or check")
    if mode == "check":
        return check_last_run(Kube(resolve_kube(kube)), store, s3_block)
    log = get_run_logger()
    # Everything that can be wrong with the input is found before the API is touched.
    settings = resolve_settings(dict(
        INCLUDE_STARVAULT_UNSEAL_TOKENS=INCLUDE_STARVAULT_UNSEAL_TOKENS, INCLUDE_PKI_DATA=INCLUDE_PKI_DATA,
        INCLUDE_DATA_ENCRYPTION_CONFIG=INCLUDE_DATA_ENCRYPTION_CONFIG,
        INCLUDE_STARVAULT_DB_BACKUP=INCLUDE_STARVAULT_DB_BACKUP, RETENTION_PERIOD_DAYS=RETENTION_PERIOD_DAYS))
    obj = k.render_cronjob_kustomization(
        source_kind=source_kind, source_name=source_name, source_namespace=source_namespace,
        path=path or k.cronjob_path(masters), settings=settings, schedule=k.check_cron(schedule),
        volume=k.backup_volume(nfs_server, nfs_path, volume))
    api = Kube(resolve_kube(kube))
    if not api.namespace_exists(k.GITOPS_NS):
        raise NovaDRError(f"namespace {k.GITOPS_NS} does not exist at {api.host}: is Flux installed? Nothing was applied")
    current = api.get_cr(k.FLUX, "kustomizations", k.GITOPS_NS, k.CRONJOB_KUSTOMIZATION)
    plan = plan_install(obj, current, api.host)
    log.info("%s", plan.text())
    mc.publish(f"{mc.slug(FLOW_NAME)}-plan", plan.markdown(), f"What {FLOW_NAME} will do")
    approval = mc.approval_gate(plan, auto_approve, approval_timeout_minutes)

    applied = api.apply_cr(k.FLUX, "kustomizations", obj, force=force)
    gen = applied["metadata"]["generation"]
    log.info("applied Kustomization %s/%s, generation %s", k.GITOPS_NS, k.CRONJOB_KUSTOMIZATION, gen)

    def probe():
        cur = api.get_cr(k.FLUX, "kustomizations", k.GITOPS_NS, k.CRONJOB_KUSTOMIZATION)
        settled, ready, why = k.kustomization_state(cur)
        return settled and ready, why

    try:
        ready_why = wait_for(f"Kustomization {k.GITOPS_NS}/{k.CRONJOB_KUSTOMIZATION} Ready",
                             probe, timeout_minutes * 60, poll_seconds)
    except KubeError as err:
        raise KubeError(f"{err}. Check the source {source_kind}/{source_namespace}/{source_name} and the path "
                        f"{obj['spec']['path']} (`flux get kustomizations -n {k.GITOPS_NS}`)") from None
    cron = api.read("CronJob", k.BACKUP_NS, k.CRONJOB)
    if cron is None:
        raise NovaDRError(f"Kustomization is Ready but CronJob {k.BACKUP_NS}/{k.CRONJOB} does not exist: the path "
                          f"{obj['spec']['path']} does not install it")
    spec = cron.get("spec") or {}
    status = cron.get("status") or {}
    rows = [["schedule", spec.get("schedule")], ["suspended", spec.get("suspend", False)],
            ["last schedule", status.get("lastScheduleTime", "never")],
            ["last success", status.get("lastSuccessfulTime", "never")]]
    if spec.get("schedule") != obj["spec"]["postBuild"]["substitute"]["BACKUP_SCHEDULE"]:
        log.warning("CronJob schedule %r differs from the one asked for (%r)", spec.get("schedule"), schedule)
    report = (f"# {FLOW_NAME}\n\nKustomization `{k.GITOPS_NS}/{k.CRONJOB_KUSTOMIZATION}` generation {gen}: "
              f"Ready ({ready_why}). Approved by {approval['approved_by']}.\n\n"
              f"CronJob `{k.BACKUP_NS}/{k.CRONJOB}`:\n\n" + mc.render_table(["field", "value"], rows))
    mc.publish(f"{mc.slug(FLOW_NAME)}-report", report, "The installed CronJob backups")
    return {"generation": gen, "ready": ready_why, "cronjob": {r[0]: r[1] for r in rows}}


def check_last_run(api: Kube, store: str | None, s3_block: str | None) -> dict:
    """The newest Job of the CronJob: each backup pod's outcome per master, then the files."""
    log = get_run_logger()
    if api.read("CronJob", k.BACKUP_NS, k.CRONJOB) is None:
        raise NovaDRError(f"CronJob {k.BACKUP_NS}/{k.CRONJOB} does not exist: install it with mode=install")
    job = k.newest_job(api.jobs(k.BACKUP_NS), k.CRONJOB)
    if job is None:
        raise NovaDRError(f"CronJob {k.BACKUP_NS}/{k.CRONJOB} has not run yet; nothing to check")
    name = job["metadata"]["name"]
    uid = job["metadata"]["uid"]
    pods = [p for p in api.pods(k.BACKUP_NS)
            if any(r.get("uid") == uid for r in p["metadata"].get("ownerReferences", []))]
    rows = [[p["metadata"]["name"], (p.get("spec") or {}).get("nodeName", "?"), k.pod_outcome(p)] for p in pods]
    failed = [r for r in rows if r[2] != "Completed"]
    out = {"job": name, "pods": [dict(zip(["pod", "node", "status"], r)) for r in rows]}
    report = f"# {FLOW_NAME} check\n\nJob `{k.BACKUP_NS}/{name}`:\n\n" + mc.render_table(["pod", "node", "status"], rows)
    if store:
        sets, _ = read_sets(open_store(store, s3_block).list())
        newest = sets[0] if sets else None
        if newest is None:
            failed.append(["store", store, "no backup set"])
            report += f"\n\nStore `{store}`: no backup set."
        else:
            short = len(newest.nodes) < len(pods)
            report += (f"\n\nNewest set in `{store}`: `{newest.ts}`, {len(newest.nodes)} node archives "
                       f"({len(pods)} backup pods), etcd snapshot `{newest.etcd}`, StarVault snapshot "
                       f"`{newest.starvault or 'missing'}`.")
            if short:
                failed.append(["store", store, f"set {newest.ts} has {len(newest.nodes)} archives for {len(pods)} pods"])
            out["newest_set"] = {"ts": newest.ts, "files": newest.files}
    mc.publish(f"{mc.slug(FLOW_NAME)}-check", report, "The last CronJob backup run")
    if not pods:
        raise NovaDRError(f"Job {k.BACKUP_NS}/{name} has no pods left to check (deleted by its history limit?)")
    if failed:
        raise NovaDRError(f"last backup run {name}: " + "; ".join(f"{r[0]} on {r[1]}: {r[2]}" for r in failed))
    log.info("last backup run %s: %d pods Completed", name, len(pods))
    return out
