"""The recipe: one YAML file, validated into frozen pydantic models.

Field names follow the libraries users already know (peft's LoraConfig, bitsandbytes'
BitsAndBytesConfig, transformers' TrainingArguments) so knowledge transfers both ways.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SPLITS = ("train", "validation", "test")


class RecipeError(Exception):
    """A mistake the user can fix: carries the file, the field path and a hint.

    The CLI prints it as one line and exits with code 2. Anything else is a bug."""

    def __init__(self, message: str, field: str | None = None, file: str | None = None,
                 hint: str | None = None):
        self.message, self.field, self.file, self.hint = message, field, file, hint
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ": ".join(p for p in (self.file, self.field) if p)
        text = f"{where}: {self.message}" if where else self.message
        text = f"{text} ({self.hint})" if self.hint else text
        return shorten(" ".join(text.split("\n")), MAX_MESSAGE_CHARS)


MAX_MESSAGE_CHARS = 600  # an offending value is quoted, never pasted whole (a YAML anchor bomb is megabytes)


def shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else f"{text[:limit - 40]} ... [{len(text) - limit + 40} more characters]"


class Section(BaseModel):
    # allow_inf_nan: a learning rate of inf or nan is a mistake, never a setting.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Seed = Field(42, ge=0, le=2**32 - 1)  # what numpy and torch accept


class ModelSection(Section):
    # A Hub id, a local directory, or `package:NAME/sub/dir` (a directory inside an installed package);
    # or a GGUF file (dequantized once into a cached 16-bit model directory).
    name_or_path: str
    task: Literal["sequence-classification", "causal-lm"] = "sequence-classification"
    # Class names in label order; taken from the data (sorted) when not given.
    labels: Optional[list[str]] = None
    revision: Optional[str] = None
    trust_remote_code: bool = False


class DataSection(Section):
    # A local file or directory (csv, json, jsonl, parquet; .gz and .bz2 too), or `package:NAME/file`.
    path: Optional[str] = None
    # Or a Hugging Face Hub dataset id, with its config and revision.
    hub: Optional[str] = None
    config: Optional[str] = None
    revision: Optional[str] = None
    # Or a file (or list of files) for each split, e.g. {train: a.csv, validation: b.csv, test: c.csv}:
    # a test set kept apart. Splits not given are carved out of train (see split).
    files: Optional[dict[Literal["train", "validation", "test"], Union[str, list[str]]]] = None
    # Source split (or file stem) for each of train / validation / test, where the names differ.
    splits: Optional[dict[Literal["train", "validation", "test"], str]] = None
    # Text encoding of csv/json/yaml files (e.g. latin-1, cp1252); Python codec names.
    encoding: str = "utf-8"
    # Column names of CSV/TSV files that have no header row (the first row is then data).
    column_names: Optional[list[str]] = None
    text_column: str = "text"
    label_column: str = "label"
    # Raw label value -> label name (e.g. {1: positive}); applied before keep_labels.
    label_map: Optional[dict[Union[int, str], str]] = None
    # Keep only rows of these classes; the others are dropped and counted.
    keep_labels: Optional[list[str]] = None
    drop_duplicates: bool = False
    # Seeded random sample of at most N rows per split (after cleaning), e.g. {train: 2000}.
    sample: Optional[dict[Literal["train", "validation", "test"], int]] = None

    @model_validator(mode="after")
    def _one_source(self):
        if sum(x is not None for x in (self.path, self.hub, self.files)) != 1:
            raise ValueError("give exactly one of data.path (a local file or directory), data.files (a file per "
                             "split) or data.hub (a Hub dataset id)")
        if self.files is not None and "train" not in self.files:
            raise ValueError("data.files needs a train file")
        if self.files is not None and self.splits is not None:
            raise ValueError("data.splits renames the files of a data.path directory; with data.files name each "
                             "split's file directly")
        return self

    @field_validator("encoding")
    @classmethod
    def _codec(cls, v):
        import codecs

        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(f"unknown text encoding {v!r} (e.g. utf-8, latin-1, cp1252)") from None
        return v

    @field_validator("column_names")
    @classmethod
    def _names(cls, v):
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("give each column a distinct name")
        return v

    def file_list(self, split: str) -> list[str]:
        given = (self.files or {}).get(split, [])
        return [given] if isinstance(given, str) else list(given)

    @field_validator("sample")
    @classmethod
    def _positive_sample(cls, v):
        for split, n in (v or {}).items():
            if n <= 0:
                raise ValueError(f"sample.{split} must be a positive number of rows, got {n}")
        return v


class SplitSection(Section):
    # Used only for the splits the source lacks: carved out of train, stratified by label.
    validation_size: float = Field(0.1, ge=0, lt=1)
    test_size: float = Field(0.1, ge=0, lt=1)
    stratify: bool = True
    seed: int = Seed


class TokenizeSection(Section):
    max_length: int = Field(128, gt=0)
    truncation: bool = True
    # dynamic: pad each batch to its longest row; max_length: pad every row (the slow tutorial way).
    padding: Literal["dynamic", "max_length"] = "dynamic"
    # causal-lm: pack short examples into rows of max_length without padding (positions restart
    # and attention stays within each example).
    packing: bool = False


class PromptSection(Section):
    """causal-lm: how a data row becomes a prompt and a response to learn."""
    # Python format string over data columns, e.g. "### Instruction:\n{instruction}\n\n### Response:\n".
    template: Optional[str] = None
    # Or the tokenizer's chat template, the user turn being `template` rendered or the prompt column.
    chat_template: bool = False
    prompt_column: str = "prompt"
    response_column: str = "response"
    system_prompt: Optional[str] = None
    # false: loss on the response tokens only (the prompt is masked).
    train_on_prompt: bool = False

    @field_validator("template")
    @classmethod
    def _fields(cls, v):
        if v is not None:
            import string

            try:
                list(string.Formatter().parse(v))
            except ValueError as e:
                raise ValueError(f"not a valid template: {e}") from None
        return v

    @property
    def columns(self) -> list[str]:
        """The data columns the prompt and response read."""
        import string

        if self.template is not None:
            names = [f for _, f, _, _ in string.Formatter().parse(self.template) if f]
        else:
            names = [self.prompt_column]
        return list(dict.fromkeys(names + [self.response_column]))


class GenerationSection(Section):
    """causal-lm evaluation: continuations generated for held-out prompts."""
    num_examples: int = Field(32, gt=0)
    max_new_tokens: int = Field(64, gt=0)
    # Greedy always; sampled too when a temperature is given.
    temperature: Optional[float] = Field(None, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)


DType = Literal["float32", "bfloat16", "float16"]


class QuantizationSection(Section):
    load_in_4bit: bool = True
    load_in_8bit: bool = False
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: DType = "float32"
    # Modules kept out of quantization; None means the output heads and the pooler (tasks.model.NOT_QUANTIZED).
    llm_int8_skip_modules: Optional[list[str]] = None

    @model_validator(mode="after")
    def _one_mode(self):
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are exclusive; set one of them to false")
        return self

    @property
    def mode(self) -> str:
        return "4bit" if self.load_in_4bit else "8bit" if self.load_in_8bit else "none"


class LoraSection(Section):
    # false: full fine-tuning (every weight trained; needs an unquantized base), for comparisons.
    enabled: bool = True
    r: int = Field(8, gt=0)
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    use_dora: bool = False
    use_rslora: bool = False
    # Extra fully trained modules; the task head is always trained.
    modules_to_save: Optional[list[str]] = None

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("target_modules is empty: name modules (e.g. [query, value]) or use all-linear")
        return v


class TrainSection(Section):
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = -1  # > 0 overrides num_train_epochs
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup",
                               "cosine_with_restarts", "polynomial"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    per_device_train_batch_size: int = Field(16, gt=0)
    per_device_eval_batch_size: int = Field(64, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    gradient_checkpointing: bool = False
    # Keep the tensors saved for backward (checkpointed layer inputs, logits) in pinned CPU memory
    # (CUDA only): about a GiB less GPU memory on a 7B model at sequence 2048, for some speed.
    offload_activations: bool = False
    # A GPU memory budget: the fastest set-up whose estimated peak fits it is chosen (largest
    # micro-batch, the rest of per_device_train_batch_size x gradient_accumulation_steps accumulated;
    # then checkpointing; then offload). The examples per optimizer step never change.
    max_memory_gib: Optional[float] = Field(None, gt=0)
    # Fast paths. fused_lora: each LoRA layer as one autograd function (same arithmetic as peft's).
    # kernels: Liger's Triton kernels on CUDA (auto: where supported). attention: auto picks
    # flash-attn where installed, else PyTorch SDPA. A fast path the machine lacks warns and falls
    # back, or fails when require_fast_paths.
    fused_lora: bool = True
    # compile: torch.compile each transformer layer (the first steps pay the compile, tens of
    # seconds); auto: on CUDA where Triton is installed; not on the CPU.
    compile: Literal["auto", True, False] = "auto"
    kernels: Literal["auto", "liger", "none"] = "auto"
    attention: Literal["auto", "sdpa", "flash_attention_2", "flex_attention", "eager"] = "auto"
    require_fast_paths: bool = False
    optim: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd"] = "adamw_torch"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    seed: int = Seed
    # Batches of rows of similar length: far less padding with dynamic padding.
    group_by_length: bool = True
    logging_steps: int = Field(10, gt=0)
    eval_steps: Optional[int] = Field(None, gt=0)  # None: at the end of each epoch
    save_steps: int = Field(100, gt=0)
    save_total_limit: int = Field(2, gt=0)

    # How fast and in how much memory, not what is computed: left out of the train stage's cache key,
    # so a run stopped (say, out of memory) resumes under a new budget.
    NOT_IN_CACHE_KEY: ClassVar[tuple[str, ...]] = (
        "gradient_checkpointing", "offload_activations", "max_memory_gib", "fused_lora", "kernels", "attention",
        "require_fast_paths", "save_steps", "save_total_limit")


class EvaluateSection(Section):
    # Metric modules under tasks/metrics/ by name, or paths to evaluate-compatible metric scripts.
    # Default: accuracy, f1, precision, recall (classification); rouge (causal-lm, on generations).
    metrics: Optional[list[str]] = None
    generation: GenerationSection = GenerationSection()

    def metric_names(self, task: str) -> list[str]:
        if self.metrics is not None:
            return self.metrics
        return ["rouge"] if task == "causal-lm" else ["accuracy", "f1", "precision", "recall"]


MergeBase = Literal["dequantized", "original"]


class MergeSection(Section):
    enabled: bool = True
    # The merged model to ship (logged and registered):
    # dequantized: the 4-bit base dequantized, then merged (exactly what training saw);
    # original: the original 16-bit base reloaded, then merged.
    base: MergeBase = "dequantized"
    dtype: DType = "bfloat16"  # the dtype the merged model is saved in
    # Also build and measure every variant side by side: adapter, merged-dequant, merged-original
    # and merged-4bit (the merge re-quantized to NF4, as peft's merge into a 4-bit model gives).
    compare: bool = False


class PromotionSection(Section):
    # After each run, point the registry's `champion` alias at the new candidate only if it beats
    # the champion's run on `metric` by more than `margin` (scheduled retraining turns this on).
    enabled: bool = False
    # A metric the run logs (test_*, merged_test_*). Default: the promoted model's own figure,
    # accuracy for a classifier and loss (mode min) for a causal LM, of the merged model
    # (merged_test_*) when that is what is promoted.
    metric: Optional[str] = None
    mode: Optional[Literal["max", "min"]] = None  # default: min for losses and perplexity, else max
    margin: float = Field(default=0.0, ge=0)
    # Which registered model is promoted; default: the merged model when the recipe merges.
    model: Optional[Literal["merged", "adapter"]] = None

    def model_for(self, merges: bool) -> str:
        return self.model or ("merged" if merges else "adapter")

    def metric_for(self, merges: bool, task: str) -> str:
        return self.metric or default_promotion_metric(self.model_for(merges) == "merged", task)

    def mode_for(self, merges: bool, task: str) -> str:
        return self.mode or lower_is_better(self.metric_for(merges, task))


def default_promotion_metric(merged: bool, task: str) -> str:
    """The promoted model's own test figure."""
    return ("merged_test_" if merged else "test_") + ("loss" if task == "causal-lm" else "accuracy")


def lower_is_better(metric: str) -> str:
    return "min" if metric.endswith(("loss", "perplexity")) else "max"


def registry_name(value: str | None) -> str | None:
    """What MLflow accepts as a registered model name, and what `NAME@ALIAS` and the registry's
    filter strings can carry."""
    if value is None:
        return value
    if not value.strip() or value != value.strip():
        raise ValueError("must be a non-empty name without leading or trailing spaces")
    bad = sorted({c for c in value if c in "/:@'\"\\" or not c.isprintable()})
    if bad:
        raise ValueError(f"cannot contain {' '.join(repr(c) for c in bad)} (MLflow registered model names and "
                         f"NAME@ALIAS references)")
    if value in (".", ".."):
        raise ValueError("is not a name")
    return value


class TrackingSection(Section):
    experiment_name: str = "qlora"
    # Default: the local sqlite store under mlflow/ in the current directory.
    tracking_uri: Optional[str] = None
    register_models: bool = True
    registered_model_name: Optional[str] = None  # default: the recipe name
    promotion: PromotionSection = PromotionSection()

    @field_validator("experiment_name")
    @classmethod
    def _experiment(cls, v):
        if not v.strip():
            raise ValueError("must be a non-empty name")
        return v

    _registered = field_validator("registered_model_name")(registry_name)


class Recipe(Section):
    name: str  # default: the recipe file's stem; names the MLflow run and registered models
    description: Optional[str] = None
    model: ModelSection
    data: DataSection
    split: SplitSection = SplitSection()
    tokenize: TokenizeSection = TokenizeSection()
    prompt: PromptSection = PromptSection()
    quantization: QuantizationSection = QuantizationSection()
    lora: LoraSection = LoraSection()
    train: TrainSection = TrainSection()
    evaluate: EvaluateSection = EvaluateSection()
    merge: MergeSection = MergeSection()
    tracking: TrackingSection = TrackingSection()
    # Where stage artifacts live (content-addressed), relative to the current directory.
    work_dir: str = ".qlora"

    _name = field_validator("name")(registry_name)

    @model_validator(mode="after")
    def _full_finetuning_needs_16bit(self):
        if not self.lora.enabled and self.quantization.mode != "none":
            raise ValueError("full fine-tuning (lora.enabled: false) trains every weight and needs an unquantized "
                             "base: set quantization.load_in_4bit: false")
        return self

    @model_validator(mode="after")
    def _task_fields(self):
        if self.tokenize.packing and self.model.task != "causal-lm":
            raise ValueError("tokenize.packing is for causal-lm models")
        return self

    @property
    def method(self) -> str:
        """qlora, lora or full: what the MLflow comparisons call this run."""
        if not self.lora.enabled:
            return "full"
        return "lora" if self.quantization.mode == "none" else "qlora"


# --- loading -----------------------------------------------------------------------------------

def _section_class(loc: tuple) -> type[BaseModel] | None:
    cls: Any = Recipe
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return cls if part == loc[-1] else None
        cls = field.annotation
    return cls


def _explain(err: ValidationError, file: str | None) -> RecipeError:
    e = err.errors()[0]
    loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    field = ".".join(str(p) for p in loc) or None
    if e["type"] == "extra_forbidden":
        parent = _section_class(loc)
        names = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), names, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(names)}"
        return RecipeError("unknown key", field, file, hint)
    if e["type"] == "missing":
        return RecipeError("required but missing", field, file)
    msg = e["msg"].removeprefix("Value error, ")
    if "input" in e and e["type"] not in ("model_type",) and not isinstance(e["input"], dict):
        msg += f" (got {shorten(repr(e['input']), 100)})"
    return RecipeError(msg, field, file)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"--set expects KEY=VALUE, got {text!r}", hint="e.g. --set train.learning_rate=1e-3")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise RecipeError(f"value {shorten(raw, 80)!r} is not valid YAML: {_yaml_problem(e)}", f"--set {key.strip()}",
                          hint="quote it, e.g. --set 'data.path=\"a,b\"'") from None
    return key.strip().split("."), value


def _yaml_problem(e: yaml.YAMLError) -> str:
    return " ".join(p for p in (getattr(e, "context", None), getattr(e, "problem", None)) if p) or \
        str(e).splitlines()[0]


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"cannot set {'.'.join(path)}: {part} is not a section", text)
            node = child
        node[path[-1]] = value
    return raw


def shipped_recipes_dir() -> Path | None:
    """The recipes that ship with the project: beside the code in a checkout or editable install,
    under <prefix>/share/qlora-pipeline/recipes in an installed wheel."""
    import sys

    for candidate in (Path(__file__).resolve().parent.parent / "recipes",
                      Path(sys.prefix) / "share" / "qlora-pipeline" / "recipes"):
        if candidate.is_dir() and any(candidate.glob("*.yaml")):
            return candidate
    return None


def shipped_recipes() -> dict[str, Path]:
    directory = shipped_recipes_dir()
    return {p.stem: p for p in sorted(directory.glob("*.yaml"))} if directory else {}


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file by path, or a shipped recipe by name (`qlora run quickstart`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    if str(name_or_path) in shipped and path.suffix not in (".yaml", ".yml") and len(path.parts) == 1:
        return shipped[str(name_or_path)]
    hint = f"shipped recipes: {', '.join(shipped)} (qlora recipes lists them)" if shipped else None
    raise RecipeError("recipe file not found", file=str(name_or_path), hint=hint)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = find_recipe(path)
    file = str(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise RecipeError(f"not UTF-8 text ({e.reason} at byte {e.start})", file=file) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark is not None else file
        raise RecipeError(f"not valid YAML: {_yaml_problem(e)}", file=where) from None
    if not isinstance(raw, dict):
        raise RecipeError("a recipe is a mapping of sections (model, data, ...)", file=file)
    raw.setdefault("name", path.stem)
    raw = apply_overrides(raw, overrides or [])
    return recipe_from_dict(raw, file)


def recipe_from_dict(raw: dict, file: str | None = None) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise _explain(e, file) from None


def flatten(recipe: Recipe) -> dict[str, str]:
    """Dotted keys -> string values, for MLflow params and cache keys."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = "null" if value is None else str(value)

    walk("", recipe.model_dump(mode="json"))
    return out
