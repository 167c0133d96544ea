"""Prefect automations, made (or remade) by `nova-dr serve` and `nova-dr deploy`:

- runs whose worker died are marked Crashed (Prefect's own recipe, "Detect zombie flows"):
  without it a run whose machine was lost stays Running for ever, and the cluster's next
  recovery cannot tell it from a live one;
- failed and crashed runs of our deployments are sent to a notification block (a webhook,
  Slack, e-mail...), when one is named.
"""

from __future__ import annotations

from datetime import timedelta

HEARTBEAT_SECONDS = 30  # Prefect's minimum; PREFECT_FLOWS_HEARTBEAT_FREQUENCY in each run's env
ZOMBIE = "nova-dr: crash runs whose worker is gone"
NOTIFY = "nova-dr: notify on failed runs"


def _replace(automation) -> None:
    """Made again on each deploy: the definition here is the one that counts."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for old in client.read_automations_by_name(name=automation.name):
            client.delete_automation(old.id)
    automation.create()


def ensure_zombie_automation(missed_heartbeats: int = 3) -> None:
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    _replace(Automation(
        name=ZOMBIE,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=HEARTBEAT_SECONDS * missed_heartbeats)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=(
            f"no heartbeat for {HEARTBEAT_SECONDS * missed_heartbeats}s: the worker or its machine is gone. "
            "Re-run the same recovery (the same parameters): it resumes from its checkpoints"))]))


def notification_block(block_name: str):
    """The saved notification block's id; a clear error when there is none."""
    from prefect.blocks.core import Block

    from core.errors import NovaDRError

    try:
        return Block.load(block_name)._block_document_id
    except Exception as err:  # a name the operator typed: whatever Prefect says, in one line
        raise NovaDRError(f"notification block {block_name!r}: {err}. Name it TYPE/NAME, e.g. "
                          "custom-webhook/ops (`prefect block ls` lists them); nothing was changed") from None


def ensure_failure_notification(block_id) -> None:
    from prefect.automations import Automation
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    _replace(Automation(
        name=NOTIFY,
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.role": "tag",
                                                 "prefect.resource.id": ["prefect.tag.nova-dr"]}),
            posture=Posture.Reactive, threshold=1, within=timedelta(0)),
        actions=[SendNotification(block_document_id=block_id,
                                  subject="nova-dr: {{ flow.name }} {{ flow_run.state.name }}",
                                  body="{{ flow.name }}/{{ deployment.name }} run {{ flow_run.name }} ended "
                                       "{{ flow_run.state.name }}: {{ flow_run.state.message }}")]))
