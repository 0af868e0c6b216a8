"""The Faust app of the workflow `CRMSYNC_WORKFLOW` names: `faust -A crmsync.streams.worker worker`.

`crmsync worker <workflow>` runs this same app, as a `faust.Worker` with crmsync's logging.
"""

from __future__ import annotations

import os

from crmsync.streams import catalog
from crmsync.streams.app import WorkflowApp, create_app
from crmsync.streams.settings import Settings


def _workflow() -> str:
    name = os.environ.get("CRMSYNC_WORKFLOW", "")
    if name not in catalog.NAMES:
        raise RuntimeError(
            f"CRMSYNC_WORKFLOW={name!r}: set it to one of {', '.join(catalog.NAMES)}"
        )
    return name


app: WorkflowApp = create_app(_workflow(), Settings())
