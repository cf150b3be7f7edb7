"""A model another recipe produced, as this recipe's starting point (e.g. a supervised recipe's
model, then tuned on preferences). `model.name_or_path` names it:

- `models:/NAME/VERSION` or `models:/NAME@ALIAS`: a registered version (an adapter, a merged model);
- `recipe:PATH`: the latest finished run of the recipe at PATH, its adapter (or its fully trained model).

It is downloaded once into `<work_dir>/upstream/`, identified by its artifact location; the stages key
it by its files' content like any base, so the run that produced it (and the version, where
registered) is recorded, and an alias moved to a new version re-runs what follows. An adapter is
continued, not merged: the base it names is this run's base, the adapter its starting point
(`StartingAdapter`): the reference model, and the weights training starts from."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from qlora.runtime.secrets import reveal
from qlora.tasks import store
from qlora.tasks.recipe import LoraSection, RecipeError, shorten
from qlora.tasks.results import StartingAdapter
from qlora.tasks.weights import safetensors_files

REGISTRY_PREFIX = "models:/"
RECIPE_PREFIX = "recipe:"
ADAPTER_CONFIG = "adapter_config.json"


def is_registered(location: str) -> bool:
    return reveal(location).startswith(REGISTRY_PREFIX)


def is_upstream(location: str) -> bool:
    """Whether the location names what another run produced (a registered model or a recipe's run)."""
    return reveal(location).startswith((REGISTRY_PREFIX, RECIPE_PREFIX))


def upstream_name(location: str, field: str) -> str | None:
    """What a chain's earlier recipe must produce for this location: the registered model's name, or
    `recipe:<the recipe file's absolute path>` (None for anything else)."""
    if is_registered(location):
        return _parts(location, field)[0]
    if reveal(location).startswith(RECIPE_PREFIX):
        return recipe_reference(reveal(location)[len(RECIPE_PREFIX):])
    return None


def recipe_reference(recipe_file: str) -> str:
    return RECIPE_PREFIX + str(Path(recipe_file).expanduser().resolve())


def _parts(location: str, field: str) -> tuple[str, str, bool]:
    """(name, version or alias, whether an alias) of a models:/ URI."""
    ref = reveal(location)[len(REGISTRY_PREFIX):]
    name, sep, which = ref.partition("@") if "@" in ref else ref.rpartition("/")
    if not sep or not name or not which:
        raise RecipeError(f"'{shorten(reveal(location), 80)}' is not models:/NAME/VERSION or models:/NAME@ALIAS", field)
    return name, which, "@" in ref


def registered_version(location: str, tracking_uri: str, field: str):
    """The MLflow ModelVersion a models:/ URI names (one line naming the field when it does not exist)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from qlora.tasks.tracking import check_tracking

    name, which, alias = _parts(location, field)
    check_tracking(tracking_uri, field, existing=True)  # a registry to read: never a new empty store
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        return client.get_model_version_by_alias(name, which) if alias else client.get_model_version(name, which)
    except MlflowException as e:
        raise RecipeError(f"{shorten(reveal(location), 80)} not found in the tracking store {tracking_uri}: "
                          f"{str(e).splitlines()[0][:160]}", field,
                          hint="run the recipe that registers it first (qlora run RECIPE), in the same tracking store") \
            from None


def download_upstream(location: str, tracking_uri: str, work_dir: str, field: str) -> tuple[Path, dict]:
    """What a models:/ or recipe: location names, in <work_dir>/upstream/<key>/ (downloaded once), and
    what identifies it: the location, the name (and version), the run that logged it."""
    if is_registered(location):
        version = registered_version(location, tracking_uri, field)
        return _download(version.source, tracking_uri, work_dir), {
            "uri": reveal(location), "name": version.name, "version": str(version.version), "run_id": version.run_id}
    recipe_file = reveal(location)[len(RECIPE_PREFIX):]
    uri, run, artifact = latest_finished_run(recipe_file, field)
    return _download(f"runs:/{run.info.run_id}/{artifact}", uri, work_dir), {
        "uri": reveal(location), "name": run.data.tags.get("qlora.recipe", ""), "version": "",
        "run_id": run.info.run_id}


def latest_finished_run(recipe_file: str, field: str):
    """(tracking URI, the run, the artifact to start from) of the recipe's newest FINISHED pipeline run:
    its adapter, or its model when it trained every weight."""
    from qlora.tasks.recipe import load_recipe
    from qlora.tasks.tracking import check_tracking, mlflow_client, tracking_uri_of

    path = Path(recipe_file).expanduser()
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {recipe_file}", field)
    try:
        upstream = load_recipe(path)
    except RecipeError as e:
        raise RecipeError(f"the recipe it names is not valid: {e}", field) from None
    uri = tracking_uri_of(upstream)
    check_tracking(uri, field, existing=True)
    client = mlflow_client(uri)
    experiment = client.get_experiment_by_name(upstream.tracking.experiment_name)
    runs = [] if experiment is None else client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`qlora.recipe` = '{upstream.name}' and "
                                                  f"attributes.status = 'FINISHED'",
        order_by=["attributes.end_time DESC"], max_results=1)
    if not runs:
        raise RecipeError(f"recipe '{upstream.name}' ({recipe_file}) has no finished run in the tracking store {uri}",
                          field, hint=f"run it first (qlora run {recipe_file}), or chain both: "
                                      f"qlora run {recipe_file} THIS_RECIPE")
    return uri, runs[0], "adapter" if upstream.lora.enabled else "model"


def _download(artifact_uri: str, tracking_uri: str, work_dir: str) -> Path:
    import mlflow.artifacts

    into = Path(work_dir) / "upstream" / store.hash_value(artifact_uri)
    complete = into / ".complete"  # holds where in `into` the model landed
    if not complete.is_file():
        into.mkdir(parents=True, exist_ok=True)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(into),
                                                         tracking_uri=tracking_uri))
        checkpoint, tokenizer = checkpoint_dirs(local)
        for file in tokenizer.iterdir() if tokenizer != checkpoint and tokenizer.is_dir() else ():
            if file.is_file() and not (checkpoint / file.name).exists():  # one directory, as every stage reads a base
                shutil.copy2(file, checkpoint / file.name)
        complete.write_text(str(local.resolve().relative_to(into.resolve())))
    return into / complete.read_text()


def checkpoint_dirs(directory: Path) -> tuple[Path, Path]:
    """(checkpoint, tokenizer) of a downloaded model: an MLflow transformers model keeps them under
    model/ and components/tokenizer/; a plain checkpoint or adapter holds both."""
    if (directory / "MLmodel").is_file():
        return directory / "model", directory / "components" / "tokenizer"
    return directory, directory


def starting_adapter(directory: Path, field: str) -> tuple[str, StartingAdapter] | None:
    """(the base it was trained on, the adapter) when the directory holds a LoRA adapter; None for a model."""
    config_file = directory / ADAPTER_CONFIG
    if not config_file.is_file() or (directory / "config.json").is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise RecipeError(f"{config_file} is not valid JSON: {e}", field) from None
    if config.get("peft_type") != "LORA" or not config.get("base_model_name_or_path"):
        raise RecipeError(f"{config_file}: not a LoRA adapter naming its base (peft_type "
                          f"{config.get('peft_type')!r}, base_model_name_or_path "
                          f"{config.get('base_model_name_or_path')!r})", field)
    weights = [p.name for p in safetensors_files(directory, field, stem="adapter_model")]  # each checked whole
    adapter = StartingAdapter(hash=store.tree_fingerprint(directory, [ADAPTER_CONFIG, *weights]),
                              path=str(directory.resolve()), config=config)
    return config["base_model_name_or_path"], adapter


# The adapter's settings that training continues with: recipe fields of the same names as peft's.
_CONTINUED = ("r", "lora_alpha", "lora_dropout", "bias", "use_dora", "use_rslora", "target_modules")


def continued_lora(lora: LoraSection, start: StartingAdapter | None) -> LoraSection:
    """The lora section training uses: the recipe's own, or, continuing an adapter, that adapter's shape
    (rank, alpha, targets...). A field the recipe sets to something else is refused: the adapter's
    weights only fit its own shape."""
    if start is None:
        return lora
    if not lora.enabled:
        raise RecipeError("lora.enabled: false trains every weight, but model.name_or_path names an adapter "
                          "to continue", "lora.enabled")
    if lora.init != "default":
        raise RecipeError(f"lora.init: {lora.init} initialises a new adapter, but model.name_or_path names an adapter "
                          f"to continue (it starts from its weights)", "lora.init")
    adopted = {}
    for field in _CONTINUED:
        value = start.config.get(field)
        if value is None:
            continue
        value = sorted(value) if isinstance(value, list) else value
        ours = getattr(lora, field)
        ours = sorted(ours) if isinstance(ours, list) else ours
        if field in lora.model_fields_set and ours != value:
            raise RecipeError(f"lora.{field}: {ours} here, but the adapter this recipe continues has {value}",
                              f"lora.{field}", hint=f"leave lora.{field} out: training continues the adapter as "
                                                    f"it was trained")
        adopted[field] = value
    return lora.model_copy(update=adopted)
