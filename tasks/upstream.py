"""A model another recipe produced, as this recipe's starting point: `model.name_or_path:
models:/NAME/VERSION` or `models:/NAME@ALIAS` (e.g. a supervised recipe's merged model, then tuned on
preferences). The registered version is downloaded once into `<work_dir>/upstream/`, identified by its
artifact location; the stages key it by its files' content like any base, so the run that produced it
and the alias that named it are recorded, and an alias moved to a new version re-runs what follows."""
from __future__ import annotations

import shutil
from pathlib import Path

from qlora.runtime.secrets import reveal
from qlora.tasks import store
from qlora.tasks.recipe import RecipeError, shorten

REGISTRY_PREFIX = "models:/"


def is_registered(location: str) -> bool:
    return reveal(location).startswith(REGISTRY_PREFIX)


def _parts(location: str, field: str) -> tuple[str, str, bool]:
    """(name, version or alias, whether an alias) of a models:/ URI."""
    ref = reveal(location)[len(REGISTRY_PREFIX):]
    name, sep, which = ref.partition("@") if "@" in ref else ref.rpartition("/")
    if not sep or not name or not which:
        raise RecipeError(f"'{shorten(reveal(location), 80)}' is not models:/NAME/VERSION or models:/NAME@ALIAS", field)
    return name, which, "@" in ref


def registered_name(location: str, field: str) -> str | None:
    """The registered model's name of a models:/ URI (None for anything else)."""
    return _parts(location, field)[0] if is_registered(location) else None


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


def download_registered(location: str, tracking_uri: str, work_dir: str, field: str) -> tuple[Path, dict]:
    """The registered version's files in <work_dir>/upstream/<key>/ (downloaded once), and what names it:
    the URI, the registered name and version, the run that logged it."""
    import mlflow.artifacts

    version = registered_version(location, tracking_uri, field)
    into = Path(work_dir) / "upstream" / store.hash_value(version.source)
    complete = into / ".complete"  # holds where in `into` the model landed
    if not complete.is_file():
        into.mkdir(parents=True, exist_ok=True)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(into),
                                                         tracking_uri=tracking_uri))
        checkpoint, tokenizer = checkpoint_dirs(local)
        for file in tokenizer.iterdir() if tokenizer != checkpoint and tokenizer.is_dir() else ():
            if file.is_file() and not (checkpoint / file.name).exists():  # one directory, as every stage reads a base
                shutil.copy2(file, checkpoint / file.name)
        complete.write_text(str(local.resolve().relative_to(into.resolve())))
    directory = into / complete.read_text()
    return directory, {"uri": reveal(location), "name": version.name, "version": str(version.version),
                       "run_id": version.run_id}


def checkpoint_dirs(directory: Path) -> tuple[Path, Path]:
    """(checkpoint, tokenizer) of a downloaded model: an MLflow transformers model keeps them under
    model/ and components/tokenizer/; a plain checkpoint or adapter holds both."""
    if (directory / "MLmodel").is_file():
        return directory / "model", directory / "components" / "tokenizer"
    return directory, directory
