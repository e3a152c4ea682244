"""Prefect deployments of a config: per stream, an incremental and a backfill deployment.

Each stream is its own flow, named after it (`flow_for` in pagesync.flows.stream). A runner
or worker loads a deployment's flow in a fresh process from the deployment's entrypoint, and
an entrypoint names a module attribute, so this module answers one per stream: the
entrypoint `pagesync.prefect.deploy.items` resolves (PEP 562 module `__getattr__`) to the flow of
stream `items`, named `items`, with as many partitions in flight as its source allows in
the config that `$PAGESYNC_CONFIG` names (the deployments set it for their runs).

What a deployment's run form shows is its parameter schema: Prefect builds it from the flow's
signature and docstring (`parameter_schema`); each deployment keeps only the parameters that
make sense in its form. The stream and the absolute config path are fixed parameters.
"""

from __future__ import annotations

import copy
import logging
import os
from datetime import timedelta
from typing import Any, Literal
from urllib.parse import unquote

from prefect import Flow
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.utilities.callables import ParameterSchema, parameter_schema

from pagesync.core.config import Config, Source, load_config
from pagesync.core.errors import ConfigError
from pagesync.flows.stream import flow_for

Kind = Literal["incremental", "backfill"]
INCREMENTAL: Kind = "incremental"
BACKFILL: Kind = "backfill"

#: Parameters each deployment's run form offers (the others are fixed per deployment).
FORM: dict[Kind, tuple[str, ...]] = {
    INCREMENTAL: ("full_refresh",),
    BACKFILL: ("start", "end", "backfill_id"),
}
REQUIRED: dict[Kind, tuple[str, ...]] = {INCREMENTAL: (), BACKFILL: ("start", "end")}

_log = logging.getLogger("pagesync")


def entrypoint(stream: str) -> str:
    """The entrypoint of a stream's flow: `pagesync.prefect.deploy.<stream>`.

    Prefect splits an entrypoint at its last dot (and treats a colon as a file path), so
    those characters are percent-encoded in the attribute name.
    """
    escaped = stream.replace("%", "%25").replace(".", "%2E").replace(":", "%3A")
    return f"{__name__}.{escaped}"


def __getattr__(name: str) -> Flow[..., Any]:
    """`pagesync.prefect.deploy.<stream>`: the stream's own flow, for entrypoints."""
    if name.startswith("_"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return stream_flow(unquote(name))


def stream_flow(stream: str, config: Config | None = None) -> Flow[..., Any]:
    """The flow of `stream`, named after it, its concurrency from `config` (default: the
    config file of $PAGESYNC_CONFIG, or ./pagesync.yaml)."""
    concurrency = Source.model_fields["concurrency"].default
    try:
        cfg = config or load_config(None)
        concurrency = cfg.sources[cfg.stream(stream).source].concurrency
    except ConfigError as e:
        _log.warning("stream %s: partitions in flight default to %d (%s)", stream, concurrency, e)
    return flow_for(stream, concurrency)


def form_schema(flow: Flow[..., Any], kind: Kind) -> ParameterSchema:
    """The flow's parameter schema (types, descriptions from its docstring) cut down to what
    this kind of deployment asks for; backfill ranges are required, never null."""
    full = parameter_schema(flow).model_dump(exclude_unset=True)
    properties: dict[str, Any] = {}
    for position, name in enumerate(FORM[kind]):
        prop = copy.deepcopy(full["properties"][name])
        prop["position"] = position
        if "description" in prop:  # docstring lines wrap; the form reflows them
            prop["description"] = " ".join(prop["description"].split())
        options = [o for o in prop.pop("anyOf", []) if o.get("type") != "null"]
        if len(options) == 1:
            prop.update(options[0])
        elif options:
            prop["anyOf"] = options
        if prop.get("default", 0) is None:
            del prop["default"]
        properties[name] = prop
    return ParameterSchema(
        title=full.get("title", "Parameters"),
        type="object",
        properties=properties,
        required=list(REQUIRED[kind]),
        definitions=full.get("definitions", {}),
    )


def _schedule(config: Config, stream: str) -> dict[str, Any]:
    schedule = config.streams[stream].schedule
    if schedule is None:
        return {}
    if schedule.cron is not None:
        return {"cron": schedule.cron}
    return {"interval": timedelta(seconds=schedule.interval or 0)}


def describe_schedule(config: Config, stream: str) -> str:
    schedule = config.streams[stream].schedule
    if schedule is None:
        return "on demand"
    if schedule.cron is not None:
        return f"cron {schedule.cron}"
    return f"every {schedule.interval:g}s"


def _description(config: Config, stream: str, kind: Kind) -> str:
    if kind == BACKFILL:
        return (
            f"Backfill of stream {stream}: syncs [start, end) window by window. Running the "
            "same range again (or Retry on a failed run) skips complete windows and resumes "
            "the others from their last committed page. Never moves the incremental "
            f"high-water mark backwards. Config: {config.path}"
        )
    return (
        f"Incremental sync of stream {stream} ({describe_schedule(config, stream)}): resumes "
        "unfinished partitions from their last committed page, then continues from the "
        f"high-water mark. Config: {config.path}"
    )


def _set_form(deployment: RunnerDeployment, schema: ParameterSchema) -> None:
    """Give the deployment's run form `schema`. RunnerDeployment has no public setter for
    it; `prefect deploy` sets this same private attribute from the flow. Should a Prefect
    release rename it, the form keeps Prefect's full schema (every flow parameter) and a
    warning says so, rather than a deployment without a form."""
    current = getattr(deployment, "_parameter_openapi_schema", None)
    if not isinstance(current, ParameterSchema):
        _log.warning(
            "this Prefect's deployments keep their parameter schema elsewhere: the run form of "
            "%s/%s shows every flow parameter", deployment.flow_name, deployment.name,
        )  # fmt: skip
        return
    deployment._parameter_openapi_schema = schema


def build_deployments(config: Config, *, work_pool: str | None = None) -> list[RunnerDeployment]:
    """Two deployments per stream of `config`: `incremental` (scheduled from the stream's
    `schedule:`, if any) and `backfill` (on demand, asks for start and end).

    Without `work_pool` they are for a runner in this process (`pagesync up`); with one,
    for that pool's workers, which must have pagesync installed and the config file at the
    same path. Nothing secret goes in: the parameters are the stream and the config path.
    """
    if config.path is None:
        raise ConfigError("deployments need a config read from a file")
    path = str(config.path.resolve())
    out: list[RunnerDeployment] = []
    for stream in config.streams:
        flow = stream_flow(stream, config)
        for kind in (INCREMENTAL, BACKFILL):
            deployment = RunnerDeployment.from_flow(
                flow,
                name=kind,
                parameters={"stream": stream, "config": path},
                description=_description(config, stream, kind),
                tags=["pagesync", f"stream:{stream}", kind],
                paused=False,  # each registration resumes schedules a stopped runner paused
                entrypoint_type=EntrypointType.MODULE_PATH,
                **(_schedule(config, stream) if kind == INCREMENTAL else {}),
            )
            deployment.entrypoint = entrypoint(stream)
            _set_form(deployment, form_schema(flow, kind))
            # Set explicitly so re-registering moves a deployment between a pool and a runner.
            deployment.work_pool_name = work_pool
            deployment.work_queue_name = None
            deployment.job_variables = {"env": {"PAGESYNC_CONFIG": path}} if work_pool else {}
            out.append(deployment)
    if any(s.fan_out == "deployment" for s in config.streams.values()):
        out.append(partition_deployment(path, work_pool))
    return out


def partition_deployment(config_path: str, work_pool: str | None) -> RunnerDeployment:
    """The deployment whose runs are `fan_out: deployment` streams' batches of partitions
    (flows/fanout.py): one for every stream of the config, each run told its stream and
    partitions by the coordinator; never run by hand, so it has no schedule."""
    from pagesync.flows.fanout import DEPLOYMENT, run_partitions

    deployment = RunnerDeployment.from_flow(
        run_partitions,
        name=DEPLOYMENT,
        description=(
            "Batches of partitions of streams with fan_out: deployment, started by each "
            f"stream's flow run (the coordinator). Config: {config_path}"
        ),
        tags=["pagesync", "partitions"],
        paused=False,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    deployment.entrypoint = f"{run_partitions.fn.__module__}.run_partitions"
    deployment.work_pool_name = work_pool
    deployment.work_queue_name = None
    deployment.job_variables = {"env": {"PAGESYNC_CONFIG": config_path}} if work_pool else {}
    return deployment


def serve_environment(config: Config) -> None:
    """For runs a runner in this process starts: they inherit os.environ, and the
    entrypoint finds the stream's concurrency in this config."""
    if config.path is not None:
        os.environ["PAGESYNC_CONFIG"] = str(config.path.resolve())
