"""The served deployments: names, parameters, the new-labels trigger and the optional schedule."""

from __future__ import annotations

from flows.serving import build_deployments, labels_updated_trigger
from tasks.events import LABELS_UPDATED_EVENT


def test_full_pipeline_deployment_has_the_trigger_and_no_schedule_by_default() -> None:
    deployment, ablation, tagging = build_deployments(
        config="configs/tiny.yaml", overrides={"train.steps": 3}
    )
    assert (tagging.flow_name, tagging.name) == ("lesa", "tag-images")
    assert tagging.entrypoint == "flows.tag_flow.tag_images"
    assert tagging.parameters == deployment.parameters
    assert (ablation.flow_name, ablation.name) == ("lesa", "ablation")
    assert ablation.entrypoint == "flows.ablation_flow.ablation"
    assert ablation.parameters == deployment.parameters
    assert not ablation.triggers and ablation.schedules in (None, [])
    assert deployment.flow_name == "lesa"
    assert deployment.name == "full-pipeline"
    assert deployment.entrypoint == "flows.full_pipeline_flow.lesa"
    assert deployment.parameters == {"config": "configs/tiny.yaml", "overrides": {"train.steps": 3}}
    assert deployment.schedules in (None, [])
    [trigger] = deployment.triggers
    assert trigger.expect == {LABELS_UPDATED_EVENT}
    assert trigger.parameters["config"] == "{{ event.payload.config }}"
    assert trigger.parameters["overrides"] == "{{ event.payload.overrides }}"


def test_cron_schedule_and_watcher_deployment_are_optional() -> None:
    pipeline, _, _, watcher = build_deployments(cron="0 3 * * *", watch_every=300)
    assert pipeline.schedules[0].schedule.cron == "0 3 * * *"
    assert watcher.flow_name == "lesa-watch-labels"
    assert watcher.schedules[0].schedule.interval.total_seconds() == 300


def test_trigger_only_listens_to_lesa_datasets() -> None:
    trigger = labels_updated_trigger()
    assert trigger.match.model_dump()["prefect.resource.id"] == "lesa.dataset.*"
