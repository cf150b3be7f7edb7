"""Scheduled retraining: a recipe deployed as a Prefect deployment of the pipeline flow.

- `qlora deploy RECIPE --cron "0 3 * * 1"` serves it from this process (`flow.serve`): one machine.
- `qlora deploy RECIPE --cron ... --pool NAME` registers it with a work pool; a worker
  (`prefect worker start --pool NAME`) runs it. `prefect.yaml` at the repository root does the same
  for `prefect deploy`.

The recipe travels as the deployment's parameter, validated and with its paths made absolute, so a
run finds the same data, work directory and tracking store whatever directory it starts in. Each
run fingerprints its data: unchanged data and recipe are cache hits end to end; changed data
retrains and the candidate is promoted only if it beats the champion (tracking.promotion).
"""
from __future__ import annotations

import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

from qlora.tasks.recipe import Recipe, RecipeError

REPO = Path(__file__).resolve().parent.parent


def check_schedule(cron: str | None, interval: float | None) -> None:
    if cron is None and interval is None:
        raise RecipeError("no schedule given", "--cron", hint='e.g. --cron "0 3 * * 1" or --interval 3600')
    if cron is not None and interval is not None:
        raise RecipeError("give one of --cron or --interval", "--cron")
    if interval is not None and interval <= 0:
        raise RecipeError(f"interval must be a positive number of seconds, got {interval:g}", "--interval")
    if cron is not None:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=cron)
        except ValueError:
            raise RecipeError(f"'{cron}' is not a valid cron expression", "--cron",
                              hint='five fields: minute hour day-of-month month day-of-week, e.g. "0 3 * * 1"') from None


def prefect_api_url() -> str:
    """The Prefect server deployments live on: PREFECT_API_URL (or the active profile's), answering."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise RecipeError("deploying needs a Prefect server, and none is configured", "PREFECT_API_URL",
                          hint="start one with `qlora ui` (or `prefect server start`), then "
                               "export PREFECT_API_URL=http://127.0.0.1:4200/api")
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=3) as r:
            if r.status != 200:
                raise RecipeError(f"the Prefect server at {url} answered {r.status} to /health", "PREFECT_API_URL")
    except (urllib.error.URLError, OSError) as e:
        raise RecipeError(f"cannot reach the Prefect server at {url}: {getattr(e, 'reason', e)}", "PREFECT_API_URL",
                          hint="is it running? `qlora ui` starts one") from None
    return url


def pinned(recipe: Recipe, promote: bool) -> dict:
    """The recipe as a deployment parameter: local paths absolute, the tracking store named, and
    promotion on unless turned off."""
    from qlora.tasks.tracking import tracking_uri_of

    raw = recipe.model_dump(mode="json")
    for section, key in (("data", "path"), ("model", "name_or_path")):
        value = raw[section].get(key)
        if value and not value.startswith("package:") and Path(value).exists():
            raw[section][key] = str(Path(value).resolve())
    raw["work_dir"] = str(Path(recipe.work_dir).resolve())
    raw["tracking"]["tracking_uri"] = tracking_uri_of(recipe)
    if promote:
        raw["tracking"]["promotion"]["enabled"] = True
    return raw


def deploy(recipe: Recipe, recipe_file: str, name: str | None, cron: str | None, interval: float | None,
           pool: str | None, promote: bool = True, limit: int = 1) -> str | None:
    """Serve (blocks until interrupted) or register with a work pool (returns the deployment id)."""
    from qlora.flows.finetune import finetune
    from qlora.tasks.evaluate import check_promotion

    check_schedule(cron, interval)
    raw = pinned(recipe, promote)
    from qlora.tasks.recipe import recipe_from_dict

    check_promotion(recipe_from_dict(raw, recipe_file))
    prefect_api_url()
    name = name or recipe.name
    from qlora.runtime import secrets

    parameters = {"recipe": secrets.redact(raw), "recipe_file": str(Path(recipe_file).resolve())}
    secrets.share_with_children()  # the runs `serve` starts restore them; a work pool's worker cannot
    schedule = {"cron": cron} if cron else {"interval": timedelta(seconds=interval)}
    description = f"{recipe.name}: {recipe.description or ''} (recipe {recipe_file})"
    tags = ["qlora", recipe.name]
    if pool is None:
        # limit: runs at a time in this process. One by default: a training run uses every core (or
        # the GPU), and runs of one recipe would build the same stages at once. (Each still gets its
        # own MLflow run: an unfinished run owned by a live flow run is never resumed by another.)
        finetune.serve(name=name, parameters=parameters, description=description, tags=tags,
                       pause_on_shutdown=False, limit=limit, **schedule)
        return None
    source = finetune.from_source(source=str(REPO), entrypoint="flows/finetune.py:finetune")
    return str(source.deploy(name=name, work_pool_name=pool, parameters=parameters, description=description,
                             tags=tags, build=False, push=False, print_next_steps=False, **schedule))

