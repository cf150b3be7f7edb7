"""The base model: where it is (a local directory, a package's directory, the Hub, or a GGUF file)
and its content fingerprints, checked before anything loads it."""
from __future__ import annotations

from pathlib import Path

from qlora.tasks import store
from qlora.tasks.quantize import check_quantization
from qlora.tasks.recipe import ModelSection, QuantizationSection, RecipeError
from qlora.tasks.results import BaseModelFiles, TokenizerFiles
from qlora.tasks.training.loading import TOKENIZER_FILES, skeleton
from qlora.tasks.upstream import checkpoint_dirs, download_upstream, is_upstream, starting_adapter
from qlora.tasks.weights import safetensors_files


def resolve_model(model: ModelSection, tracking_uri: str | None = None, work_dir: str = ".qlora") -> BaseModelFiles:
    """Local directory and content fingerprints (weights+config, tokenizer) of the base model. What
    another run produced (models:/NAME@ALIAS, recipe:PATH) is fetched from the tracking store into
    work_dir once; an adapter among those is continued on the base it names (`start`)."""
    upstream = start = path = None
    field, location = "model.name_or_path", model.name_or_path
    if is_upstream(location):
        if tracking_uri is None:
            raise RecipeError("a model another run produced needs the tracking store it is in", field)
        directory, upstream = download_upstream(location, tracking_uri, work_dir, field)
        path = checkpoint_dirs(directory)[0]
        adapter = starting_adapter(path, field)
        if adapter is not None:  # the base it was trained on is this run's base, found as any base is
            location, start = adapter
            path = None
            if is_upstream(location):
                raise RecipeError(f"the adapter it names was trained on {location}, itself another run's model: "
                                  f"start from that run's merged model instead", field)
    if path is None:
        path = store.resolve_location(location, field)
    if path is None:
        from qlora.tasks.hub import download_model

        path = download_model(location, model.revision, field)
    if path.is_file():
        check_gguf(path)
        return BaseModelFiles(hash=store.file_fingerprint(path), gguf=str(path.resolve()), upstream=upstream,
                              start=start)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise RecipeError(f"not a model directory (no config.json): {path}", "model.name_or_path")
    weights = [p.name for p in safetensors_files(path, "model.name_or_path")]
    tokenizer = [n for n in TOKENIZER_FILES if (path / n).is_file()]
    if not tokenizer:
        raise RecipeError(f"no tokenizer files in {path}", "model.name_or_path")
    return BaseModelFiles(hash=store.tree_fingerprint(path, ["config.json"] + weights), path=str(path.resolve()),
                          tokenizer=TokenizerFiles(hash=store.tree_fingerprint(path, tokenizer), path=str(path.resolve())),
                          upstream=upstream, start=start)


def check_gguf(path: Path) -> None:
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise RecipeError(f"not a GGUF file (it starts with {magic!r}, not b'GGUF'): {path}", "model.name_or_path",
                          hint="give a GGUF file, or a model directory with config.json")


def check_model(model: ModelSection, q: QuantizationSection, tracking_uri: str | None = None,
                work_dir: str = ".qlora") -> BaseModelFiles:
    resolved = resolve_model(model, tracking_uri, work_dir)
    if resolved.gguf is None:  # a GGUF checkpoint is read (slowly) by its convert stage
        try:
            skeleton(resolved.path, model.task, [], model.trust_remote_code)
        except RecipeError:
            raise
        except Exception as e:  # noqa: BLE001
            raise RecipeError(f"cannot read the model config: {str(e).splitlines()[0]}", "model.name_or_path") from None
    check_quantization(q)
    return resolved


