"""Scheduled retraining: a recipe deployed as a Prefect deployment of the pipeline flow.

- `qlora deploy RECIPE --cron "0 3 * * 1"` serves it from this process (`flow.serve`): one machine.
- `qlora deploy RECIPE --cron ... --pool NAME` registers it with a work pool; a worker
  (`prefect worker start --pool NAME`) runs it. `prefect.yaml` at the repository root does the same
  for `prefect deploy`.

The deployment's parameters are the recipe file and `--set` overrides that make its paths absolute,
so a run finds the same data, work directory and tracking store whatever directory it starts in. Each
run fingerprints its data: unchanged data and recipe are cache hits end to end; changed data
retrains and the candidate is promoted only if it beats the champion (tracking.promotion).
"""
from __future__ import annotations

import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

from qlora.runtime.secrets import holds_secret, reveal
from qlora.tasks.recipe import Recipe, RecipeError, find_recipe, load_recipe

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


def pinned(recipe: Recipe, overrides: list[str], promote: bool) -> list[str]:
    """The deployment's `--set` overrides: the user's, then the local paths made absolute, the
    tracking store named and promotion on unless turned off, so a run finds the same data, work
    directory and store whatever directory it starts in. Credentials never travel here (Prefect
    stores a deployment's parameters): they stay in the recipe file or the runs' environment."""
    from qlora.tasks.tracking import tracking_uri_of

    pins = list(overrides)
    for field, value in (("data.path", reveal(recipe.data.path)), ("model.name_or_path", reveal(recipe.model.name_or_path))):
        if value and not value.startswith("package:") and Path(value).exists():
            pins.append(f"{field}={Path(value).resolve()}")
    pins.append(f"work_dir={Path(recipe.work_dir).resolve()}")
    uri = tracking_uri_of(recipe)
    if recipe.tracking.tracking_uri is None and not holds_secret(uri):  # else the file or the environment names it
        pins.append(f"tracking.tracking_uri={uri}")
    if promote:
        pins.append("tracking.promotion.enabled=true")
    for text in pins:
        if holds_secret(text):
            raise RecipeError("carries credentials, which a deployment would store in Prefect's parameters",
                              f"--set {text.split('=', 1)[0]}",
                              hint="put them in the recipe file, or in the environment of the process that runs "
                                   "the deployment (e.g. MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)")
    return pins


def deploy(recipe: Recipe, recipe_file: str, overrides: list[str], name: str | None, cron: str | None,
           interval: float | None, pool: str | None, promote: bool = True, limit: int = 1) -> str | None:
    """Serve (blocks until interrupted) or register with a work pool (returns the deployment id). Each
    run reads the recipe file with the pinned overrides, as `qlora run FILE --set ...` would."""
    from qlora.flows.finetune import finetune
    from qlora.tasks.evaluate import check_promotion

    check_schedule(cron, interval)
    pins = pinned(recipe, overrides, promote)
    check_promotion(load_recipe(recipe_file, pins))
    prefect_api_url()
    name = name or recipe.name
    parameters = {"recipe_file": str(find_recipe(recipe_file).resolve()), "overrides": pins}
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

