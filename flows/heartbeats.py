"""Flow-run heartbeats that stop when the flow's work does.

A Prefect server can mark a flow run crashed when its heartbeats stop (an automation on the
`prefect.flow-run.heartbeat` events a flow run sends while it runs). Prefect sends them from a thread that sleeps in whole
seconds and that the engine joins after the run's final state, so each run it watches ends up to a
second late: an unchanged scheduled re-run (about a second of work) then takes two. `qlora run`
turns Prefect's thread off for the flow it starts and the flow sends the same events, at the same
interval, from a thread that stops as soon as the flow's body returns. A flow started any other way
(a deployment's worker, a sweep's trials, a test) keeps Prefect's own heartbeats; one reporting to
the temporary server sends none.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator


class _Asked:
    """What `sent_by_the_flow` hands the flow: the interval, and when to stop."""

    def __init__(self, seconds: int):
        self.seconds, self.stop = seconds, threading.Event()


_asked: contextvars.ContextVar[_Asked | None] = contextvars.ContextVar("qlora_heartbeats", default=None)


@contextlib.contextmanager
def sent_by_the_flow() -> Iterator[None]:
    """Around a flow run this process starts: Prefect's heartbeat thread off, the flow's own on, at
    Prefect's configured interval (none when the settings turn heartbeats off); the flow's stop when
    the run has returned, whatever it ended in."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    seconds = get_current_settings().flows.heartbeat_frequency
    if seconds is None:
        yield
        return
    asked = _Asked(seconds)
    token = _asked.set(asked)
    try:
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield
    finally:
        asked.stop.set()
        _asked.reset(token)


@contextlib.contextmanager
def none() -> Iterator[None]:
    """Around a flow run reporting to the temporary Prefect server: no heartbeats at all (that server
    dies with the run, so nothing would ever read them)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def start() -> None:
    """First thing in the flow's body: a heartbeat now and every interval until the run returns
    (nothing unless `sent_by_the_flow` turned Prefect's off)."""
    asked = _asked.get()
    if asked is None:
        return
    from prefect.context import FlowRunContext
    from prefect.events import emit_event

    resource, related = _identity(FlowRunContext.get())

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a missed beat must never fail the run
                emit_event(event="prefect.flow-run.heartbeat", resource=resource, related=related)
            if asked.stop.wait(asked.seconds):
                return

    # The flow's settings (its API URL) go with the thread, as with Prefect's own heartbeat thread.
    threading.Thread(target=contextvars.copy_context().run, args=(beat,), name="qlora-heartbeat", daemon=True).start()


def _identity(context) -> tuple[dict, list[dict]]:
    """The event's resource and related resources, as Prefect's engine names them."""
    from prefect import __version__
    from prefect.events.related import tags_as_related_resources

    run = context.flow_run
    resource = {"prefect.resource.id": f"prefect.flow-run.{run.id}", "prefect.resource.name": run.name or "",
                "prefect.version": __version__}
    related = []
    if run.flow_id:
        related.append({"prefect.resource.id": f"prefect.flow.{run.flow_id}", "prefect.resource.role": "flow",
                        "prefect.resource.name": context.flow.name if context.flow else ""})
    if run.deployment_id:
        related.append({"prefect.resource.id": f"prefect.deployment.{run.deployment_id}",
                        "prefect.resource.role": "deployment"})
    related += [r.root for r in tags_as_related_resources(set(run.tags or []))]
    return resource, related
