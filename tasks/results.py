"""What each stage hands the next: small typed records, the contract between stages.

A stage returns its record without `hash` and `dir`; `@stage` (tasks/stage.py) adds them (the content
key, the directory the stage wrote) and stores the record as JSON (result.json), read back and
validated into the same type on a cache hit. Files a stage wrote are named relative to its `dir`:
`result.file(result.adapter)`. Inputs that are not built by a stage but identify content (the base
model's files, the data source) are `Keyed` too: their `hash` is what a stage's cache key takes of them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict


class Keyed(BaseModel):
    """Content with a fingerprint: what a stage's cache key takes of it is `hash`."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    hash: str = ""


class StageResult(Keyed):
    dir: str = ""
    """The stage's directory (absolute)."""
    built_by_flow_run: Optional[str] = None
    """The Prefect flow run that built it: a later run's lineage links its cache hits back here."""
    cache_hit: bool = False

    def file(self, name: str) -> Path:
        return Path(self.dir) / name


# --- inputs identified by content ------------------------------------------------------------------

class TokenizerFiles(Keyed):
    path: str


class StartingAdapter(Keyed):
    """A LoRA adapter another run trained, which this run continues (a supervised adapter, then tuned on
    preferences): the reference is the base with it, and training starts from its weights."""
    path: str
    config: dict[str, Any]
    """Its adapter_config.json."""

    @property
    def weights_dir(self) -> Path:
        return Path(self.path)


class BaseModelFiles(Keyed):
    """The base model: a model directory (config, weights, tokenizer), or a GGUF file that the
    convert stage turns into one."""
    path: Optional[str] = None
    gguf: Optional[str] = None
    tokenizer: Optional[TokenizerFiles] = None
    upstream: Optional[dict[str, str]] = None
    """A model another run produced (models:/... or recipe:...): its URI, name, version and run id."""
    start: Optional[StartingAdapter] = None
    """When what the upstream produced is an adapter: it, on this base (the base it was trained on)."""


class JudgeModel(Keyed):
    """The classifier that judges generated answers: its checkpoint and tokenizer directories, and the
    class that counts as a good answer."""
    path: str
    tokenizer: str
    label: str


class HarnessTasks(Keyed):
    """The lm-evaluation-harness tasks a recipe asks for: their configuration, the local task files'
    content and lm-eval's version (tasks.harness.check_harness)."""


class DataSource(Keyed):
    """The data's identity: local files per split (fingerprinted), or a Hub dataset at a commit."""
    files: Optional[dict[str, list[str]]] = None
    hub: Optional[str] = None
    commit: Optional[str] = None

    def uri(self) -> str:
        """Where the data came from, as shown in MLflow and the model cards (credentials masked)."""
        from qlora.runtime.secrets import mask

        if self.hub:
            return f"https://huggingface.co/datasets/{self.hub}"
        return mask(str(Path(self.files["train"][0]).resolve()))


# --- stage results, in the order the flow builds them ----------------------------------------------

class Converted(StageResult):
    """convert: a GGUF checkpoint as a 16-bit model directory."""
    model: str
    tokenizer_hash: str
    source: str

    def as_base(self) -> BaseModelFiles:
        path = str(self.file(self.model))
        return BaseModelFiles(hash=self.hash, path=path, tokenizer=TokenizerFiles(hash=self.tokenizer_hash, path=path))


class Loaded(StageResult):
    """load: the source's rows, cleaned, one parquet file per split it has (`<split>.parquet`)."""
    splits: list[str]
    label_names: list[str]
    stats: dict[str, dict[str, int]]
    """Per split: rows read, dropped (and why), kept."""


class Split(StageResult):
    """split: train, validation and test, one parquet file each (`<split>.parquet`)."""
    rows: dict[str, int]
    label_names: list[str]


class Tokenized(StageResult):
    """tokenize: a datasets DatasetDict saved under `dataset/`."""
    stats: dict[str, dict[str, int | float]]
    label_names: list[str]

    @property
    def dataset_dir(self) -> Path:
        return self.file("dataset")


class ReferenceScores(StageResult):
    """reference: the starting model's completion log-probabilities of every preference row, per split
    (safetensors under `reference.safetensors`, arrays named `<split>.<name>`)."""
    file_name: str = "reference.safetensors"
    rows: dict[str, int]

    def by_split(self) -> dict[str, dict]:
        """split -> name -> one value per row of the split, in the tokenized dataset's order (numpy)."""
        from safetensors.numpy import load_file

        out: dict[str, dict] = {}
        for key, values in load_file(str(self.file(self.file_name))).items():
            split, _, name = key.partition(".")
            out.setdefault(split, {})[name] = values
        return out

    def scores(self, split: str) -> dict:
        """name -> one value per row of the split (see by_split)."""
        return self.by_split()[split]


class LoraPlan(StageResult):
    """lora: what training will train, resolved on the meta device."""
    enabled: bool
    task: str
    target_modules: list[str]
    modules_to_save: list[str]
    trainable_params: int
    base_params: int
    trainable_percent: float
    lora_layers: int

    @classmethod
    def uncounted(cls, task: str, target_modules: list[str], modules_to_save: list[str] = ()) -> LoraPlan:
        """A plan with its parameters not counted, for models built directly (benchmarks, tests)."""
        return cls(enabled=True, task=task, target_modules=list(target_modules), modules_to_save=list(modules_to_save),
                   trainable_params=0, base_params=0, trainable_percent=0.0, lora_layers=0)


class Quantized(StageResult):
    """quantize: the base as training loads it (quantized once and saved, or the original)."""
    path: str
    """`model` (in this stage's directory) when quantized, else the original model directory."""
    quantized: bool
    original_path: str
    task: str
    size_bytes: Optional[int] = None

    @property
    def model_path(self) -> str:
        return str(self.file(self.path)) if self.quantized else self.path


class Trained(StageResult):
    """train: the adapter (LoRA) or the whole model (full fine-tuning), with the run's figures."""
    adapter: Optional[str] = None
    model: Optional[str] = None
    history: str
    steps: int
    resumed_from_step: Optional[int] = None
    train_runtime_s: float
    train_samples: int
    train_tokens: int
    samples_per_s: float
    tokens_per_s: float
    peak_memory_bytes: int
    load_host_bytes: list[int] = []
    """Per process (by rank): the host memory loading and sharding the base took at its peak, above what the
    process held before. Sharded, rank 0 alone reads the base: the others hold their shards only."""
    load_node_bytes: int = 0
    """The first node's processes together: the peak of their own (anonymous) memory while loading and
    sharding: about one copy of the base (its shards) on the CPU, little on GPUs."""
    load_mapped_bytes: int = 0
    """The checkpoint's pages mapped from disk by the process that read it (page cache, shared)."""
    device: str
    processes: int
    distributed: str
    weights_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    final_train_loss: Optional[float] = None
    trainable_params: int
    trainable_percent: float
    label_names: list[str]
    fast_paths: list[str]
    memory_plan: dict[str, Any]

    @property
    def weights_dir(self) -> Path:
        return self.file(self.adapter or self.model)


class UntrainedBase(Keyed):
    """The base before training, evaluated as a variant (a causal LM's before-and-after)."""


class Merged(StageResult):
    """merge: the adapter folded into the base, a model directory under `model/`."""
    model: str
    strategy: Literal["dequantized", "original", "4bit"]
    variant: str
    dtype: str
    size_bytes: int
    label_names: list[str]

    @property
    def weights_dir(self) -> Path:
        return self.file(self.model)


class Evaluated(StageResult):
    """evaluate: test metrics, predictions (parquet) and, per task, a confusion matrix or the
    next-token logits of the generation prompts."""
    metrics: dict[str, Any]
    predictions: str
    examples: int
    dtype: str
    confusion_matrix: Optional[str] = None
    logits: Optional[str] = None


class Packaged(StageResult):
    """package: what users take away: the portable adapter, the MLflow model."""
    adapter: Optional[str] = None
    mlflow_model: Optional[str] = None
