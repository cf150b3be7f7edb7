"""The temporary Prefect server's application: Prefect's own API app (`create_app`, as Prefect's own
temporary server builds it: ephemeral, the last app of its process), built with the garbage collector
paused (qlora.runtime.startup), which boots it a few tenths of a second sooner. Served by uvicorn:
`uvicorn --factory qlora.prefect_app:create_app`."""
from __future__ import annotations

from qlora.runtime.startup import collector_paused


def create_app():
    with collector_paused():
        from prefect.server.api.server import create_app as prefect_app

        return prefect_app(ephemeral=True, final=True)
