"""The recipe: one YAML file, validated into frozen pydantic models.

Field names follow the libraries users already know (peft's LoraConfig, bitsandbytes'
BitsAndBytesConfig, transformers' TrainingArguments) so knowledge transfers both ways.
"""
from __future__ import annotations

import difflib
import functools
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qlora.runtime.errors import RecipeError, shorten  # noqa: F401 - RecipeError: imported from here too
from qlora.runtime.secrets import REVEALING, SecretText

SPLITS = ("train", "validation", "test")


class Section(BaseModel):
    # allow_inf_nan: a learning rate of inf or nan is a mistake, never a setting.
    # Each field's description is the docstring under it (field_descriptions reads them for the
    # reference page): not pydantic's use_attribute_docstrings, which finds every class's source
    # through inspect.getmodule at import, a tenth of a second of every command.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_as_numbers(cls, value, info):
        """`max_length: true` is a mistake, not 1 (pydantic's lax mode reads a bool as a number)."""
        if isinstance(value, bool) and not _takes_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"{str(value).lower()} is not a value of this field (a number or a name is expected)")
        return value


def field_descriptions(model: type[BaseModel]) -> dict[str, str]:
    """The docstring under each field of a section class (and of the classes it derives from),
    read from the source with the ast module."""
    docs: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if issubclass(cls, BaseModel) and cls.__module__ == __name__:
            docs.update(_field_docs_by_class().get(cls.__name__, {}))
    return {name: docs[name] for name in model.model_fields if name in docs}


@functools.lru_cache(maxsize=None)
def _field_docs_by_class() -> dict[str, dict[str, str]]:
    """This module parsed once: each class's fields followed by a string, that string."""
    import ast
    import inspect

    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    by_class = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            by_class[node.name] = {
                field.target.id: inspect.cleandoc(after.value.value)
                for field, after in zip(node.body, node.body[1:])
                if isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)}
    return by_class


def _takes_bool(annotation) -> bool:
    """Whether a field's type has a place for true/false (bool itself, or True/False in a Literal)."""
    if annotation is bool:
        return True
    if get_origin(annotation) is Literal:
        return any(isinstance(a, bool) for a in get_args(annotation))
    return any(_takes_bool(a) for a in get_args(annotation))


Seed = Field(42, ge=0, le=2**32 - 1)  # what numpy and torch accept
MAX_STEPS = 10**9  # beyond any real run; a bound that keeps step counts in the integers every library takes


class ModelSection(Section):
    name_or_path: SecretText
    """A Hub id, a local directory, or `package:NAME/sub/dir` (a directory inside an installed package); or a
    GGUF file (dequantized once into a cached 16-bit model directory); or what another run produced:
    `models:/NAME@ALIAS` or `models:/NAME/VERSION` (a registered model of this recipe's tracking store), or
    `recipe:PATH` (that recipe's latest finished run). An adapter among those is continued on its base."""
    task: Literal["sequence-classification", "causal-lm"] = "sequence-classification"
    """sequence-classification (a task head over the text) or causal-lm (a decoder learning responses to
    prompts)."""
    labels: Optional[list[str]] = None
    """Class names in label order; taken from the data (sorted) when not given."""
    revision: Optional[str] = None
    """The Hub revision (branch, tag or commit) of name_or_path."""
    trust_remote_code: bool = False
    """Let transformers run the model repository's own Python code (only for repositories you trust)."""


class DataSection(Section):
    path: Optional[SecretText] = None
    """A local file or directory (csv, tsv, json, jsonl, parquet, yaml; each optionally .gz or .bz2), or
    `package:NAME/file`, or a file's URL (s3://, gs://, az://, hf://, https://: whatever fsspec reads, with the
    scheme's package installed; fetched once into $QLORA_DATA_CACHE). A directory holds train.*, dev.* or
    validation.*, test.* (else all its files are the train split); a YAML conversation corpus gives
    prompt/response rows."""
    hub: Optional[str] = None
    """Or a Hugging Face Hub dataset id, with its config and revision."""
    config: Optional[str] = None
    """The Hub dataset's configuration name, where it has several."""
    revision: Optional[str] = None
    """The Hub dataset's revision (branch, tag or commit)."""
    files: Optional[dict[Literal["train", "validation", "test"], Union[SecretText, list[SecretText]]]] = None
    """Or a file (or list of files) for each split, e.g. {train: a.csv, validation: b.csv, test: c.csv}: a test
    set kept apart. Splits not given are carved out of train (see split)."""
    splits: Optional[dict[Literal["train", "validation", "test"], str]] = None
    """Source split (or file stem) for each of train / validation / test, where the names differ."""
    encoding: str = "utf-8"
    """Text encoding of csv/json/yaml files (e.g. latin-1, cp1252); Python codec names."""
    column_names: Optional[list[str]] = None
    """Column names of CSV/TSV files that have no header row (the first row is then data)."""
    text_column: str = "text"
    """The column holding the text to classify."""
    label_column: str = "label"
    """The column holding the label (a class name, or a class id in label order)."""
    label_map: Optional[dict[Union[int, str], str]] = None
    """Raw label value -> label name (e.g. {1: positive}); applied before keep_labels."""
    keep_labels: Optional[list[str]] = None
    """Keep only rows of these classes; the others are dropped and counted."""
    drop_duplicates: bool = False
    """Drop rows whose text repeats an earlier row's (counted)."""
    sample: Optional[dict[Literal["train", "validation", "test"], int]] = None
    """Seeded random sample of at most N rows per split (after cleaning), e.g. {train: 2000}."""

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
    validation_size: float = Field(0.1, ge=0, lt=1)
    """Fraction of the source's training rows carved out as the validation split, when the source has none."""
    test_size: float = Field(0.1, ge=0, lt=1)
    """Fraction of the source's training rows carved out as the test split, when the source has none."""
    stratify: bool = True
    """Carve splits keeping each class's share (where every class has at least two rows)."""
    seed: int = Seed
    """Seed of the split and of data.sample."""


class TokenizeSection(Section):
    max_length: int = Field(128, gt=0)
    """Longest row in tokens (prompt and response together for a causal LM); the row width for packing."""
    truncation: bool = True
    """Cut longer rows to max_length; false drops them instead. Either way they are counted."""
    padding: Literal["dynamic", "max_length"] = "dynamic"
    """dynamic: pad each batch to its longest row; max_length: pad every row (the slow tutorial way)."""
    packing: bool = False
    """causal-lm: pack short examples into rows of max_length without padding (positions restart and attention
    stays within each example)."""
    num_proc: Union[Literal["auto"], int] = "auto"
    """causal-lm: processes rendering and tokenizing a split's prompt/response rows, 20,000 at a time (the
    result does not depend on it): auto = the cores this process may use; 1 = in the run's own process, as
    is any split of 80,000 rows or fewer (starting processes would cost more than they save). A classifier's
    texts and preference pairs are tokenized in the run's own process, the tokenizer on every core."""

    @field_validator("num_proc")
    @classmethod
    def _num_proc(cls, v):
        if v != "auto" and not 1 <= v <= 1024:
            raise ValueError("must be a number of processes (1 to 1024) or auto")
        return v

    # How fast, not what is computed: the tokenized rows are the same for any number of processes.
    NOT_IN_CACHE_KEY: ClassVar[tuple[str, ...]] = ("num_proc",)

    def processes(self) -> int:
        """num_proc resolved: auto is the cores this process may run on."""
        import os

        if self.num_proc != "auto":
            return self.num_proc
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class PromptSection(Section):
    """causal-lm: how a data row becomes a prompt and a response to learn."""
    template: Optional[str] = None
    """Python format string over data columns, e.g. "### Instruction:\n{instruction}\n\n### Response:\n"."""
    chat_template: bool = False
    """Or the tokenizer's chat template, the user turn being `template` rendered or the prompt column."""
    prompt_column: str = "prompt"
    """The column holding the user turn, when there is no template."""
    response_column: str = "response"
    """The column holding the response the model learns."""
    system_prompt: Optional[str] = None
    """A system turn put before each prompt (with chat_template)."""
    train_on_prompt: bool = False
    """false: loss on the response tokens only (the prompt is masked)."""

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


PREFERENCE_LOSSES = ("dpo", "ipo", "orpo", "simpo", "kto")
REFERENCE_LOSSES = ("dpo", "ipo", "kto")  # the others need no reference model


class PreferenceSection(Section):
    """causal-lm: preference tuning on chosen/rejected pairs (or KTO's unpaired rows) instead of supervised
    fine-tuning. The names and formulas are TRL's, so its documentation applies."""
    loss: Optional[Literal["dpo", "ipo", "orpo", "simpo", "kto"]] = None
    """None: supervised fine-tuning on prompt/response rows. dpo: DPO's sigmoid loss against a reference model
    (the starting model, its log-probabilities computed once and cached); ipo: IPO's squared loss (per-token
    averaged log-ratios); orpo: ORPO's odds-ratio loss plus the chosen answers' NLL, no reference; simpo:
    SimPO's length-normalised margin loss, no reference; kto: KTO on unpaired rows (prompt, completion,
    desirable yes/no)."""
    beta: float = Field(0.1, gt=0)
    """How far the tuned model may move from the reference (dpo, ipo: IPO's tau; kto); ORPO's lambda (the
    weight of its odds-ratio term); SimPO's reward scale."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """dpo, simpo: the assumed share of flipped preference labels (conservative DPO); 0: labels trusted."""
    gamma: float = Field(0.5, ge=0)
    """simpo: the target reward margin (TRL's simpo_gamma)."""
    desirable_weight: float = Field(1.0, gt=0)
    """kto: weight of the desirable rows' loss (raise it when they are fewer than the undesirable ones)."""
    undesirable_weight: float = Field(1.0, gt=0)
    """kto: weight of the undesirable rows' loss."""
    max_prompt_length: Optional[int] = Field(None, gt=0)
    """Longest prompt in tokens: a longer one keeps its end (with tokenize.truncation), or its row is dropped.
    Completions keep their start, cut to tokenize.max_length less the prompt; a row whose prompt alone fills
    tokenize.max_length is dropped. All counted. None: only tokenize.max_length limits."""
    prompt_column: str = "prompt"
    """The prompt (text, or a list of role/content messages). Optional for conversations: their shared
    first turns are the prompt."""
    chosen_column: str = "chosen"
    """The preferred completion (text, or messages)."""
    rejected_column: str = "rejected"
    """The dispreferred completion (text, or messages)."""
    completion_column: str = "completion"
    """kto: the completion (text, or messages)."""
    label_column: str = "label"
    """kto (or pair_unpaired): whether the completion is desirable (true/false, 1/0, yes/no, or the values
    desirable_labels and undesirable_labels name)."""
    desirable_labels: Optional[list[str]] = None
    """label_column values that mark a desirable completion (e.g. [fresh]); with undesirable_labels, rows
    with any other value are dropped and counted. Default: true, 1, yes."""
    undesirable_labels: Optional[list[str]] = None
    """label_column values that mark an undesirable completion (e.g. [rotten]). Default: false, 0, no."""
    pair_unpaired: bool = False
    """dpo, ipo, orpo, simpo on unpaired rows (prompt, completion, label, as KTO's): each prompt's desirable
    and undesirable completions are paired up in a seeded random order; the rest are dropped and counted."""

    LOSS_SETTINGS: ClassVar[tuple[str, ...]] = ("beta", "label_smoothing", "gamma", "desirable_weight",
                                                "undesirable_weight")

    @property
    def enabled(self) -> bool:
        return self.loss is not None

    def data_view(self) -> "PreferenceSection":
        """What shapes the rows, for the data stages (load, tokenize) and so the reference stage: the loss's
        settings at their defaults and any paired loss as dpo, so a sweep over beta, or from DPO to IPO,
        reuses the data and the reference's scores."""
        defaults = {k: type(self).model_fields[k].default for k in self.LOSS_SETTINGS}
        return self.model_copy(update={**defaults, "loss": "kto" if self.loss == "kto" else "dpo"})

    @property
    def paired(self) -> bool:
        return self.loss is not None and self.loss != "kto"

    @property
    def unpaired_rows(self) -> bool:
        """Whether the data holds one completion per row with a label (KTO's format)."""
        return self.loss == "kto" or self.pair_unpaired

    @property
    def needs_reference(self) -> bool:
        return self.loss in REFERENCE_LOSSES

    @model_validator(mode="after")
    def _settings_of_the_loss(self):
        if self.label_smoothing and self.loss not in ("dpo", "simpo"):
            raise ValueError(f"preference.label_smoothing applies to dpo and simpo, not {self.loss}")
        if self.pair_unpaired and self.loss == "kto":
            raise ValueError("preference.pair_unpaired makes pairs for the paired losses; kto takes unpaired rows as "
                             "they are")
        both = set(self.desirable_labels or ()) & set(self.undesirable_labels or ())
        if both:
            raise ValueError(f"preference.desirable_labels and undesirable_labels both name {sorted(both)}")
        return self


class GenerationSection(Section):
    """causal-lm evaluation: continuations generated for held-out prompts."""
    num_examples: int = Field(32, gt=0)
    """How many held-out prompts get generated answers (scored with ROUGE, logged as a table)."""
    max_new_tokens: int = Field(64, gt=0)
    """Longest generated answer, in tokens."""
    temperature: Optional[float] = Field(None, gt=0)
    """Greedy always; sampled too when a temperature is given."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold of the sampled generations."""


DType = Literal["float32", "bfloat16", "float16"]


class QuantizationSection(Section):
    load_in_4bit: bool = True
    """Load the base in 4-bit (QLoRA); with load_in_8bit also false, plain LoRA on a 16/32-bit base."""
    load_in_8bit: bool = False
    """Load the base in 8-bit (LLM.int8) instead."""
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    """nf4 (NormalFloat, QLoRA's) or fp4."""
    bnb_4bit_use_double_quant: bool = True
    """Quantize the block scales too (about 0.4 bits a weight saved)."""
    bnb_4bit_compute_dtype: DType = "float32"
    """The dtype 4-bit weights are dequantized to for each matmul: bfloat16 on GPUs, float32 on CPUs."""
    llm_int8_skip_modules: Optional[list[str]] = None
    """Modules kept out of quantization. Default: the output heads and the pooler (classifier,
    pre_classifier, score, lm_head, pooler)."""

    @model_validator(mode="after")
    def _one_mode(self):
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are exclusive; set one of them to false")
        return self

    @property
    def mode(self) -> str:
        return "4bit" if self.load_in_4bit else "8bit" if self.load_in_8bit else "none"


class LoraSection(Section):
    enabled: bool = True
    """false: full fine-tuning (every weight trained; needs an unquantized base), for comparisons."""
    r: int = Field(8, gt=0)
    """The adapters' rank."""
    lora_alpha: float = Field(16, gt=0)
    """Scaling of the adapters' output (alpha / r, or alpha / sqrt(r) with use_rslora)."""
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapters' input."""
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    """Linear layers that get adapters: names or suffixes (e.g. [q_proj, v_proj]), or all-linear (every linear
    layer but the output heads)."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train: none, all, or lora_only."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    use_rslora: bool = False
    """Rank-stabilized scaling: alpha / sqrt(r)."""
    modules_to_save: Optional[list[str]] = None
    """Extra fully trained modules; the task head is always trained."""
    init: Literal["default", "gaussian", "loftq", "pissa", "olora"] = "default"
    """How the adapters start. default: peft's (A Kaiming-uniform, B zero: the adapted model starts as the base);
    gaussian: A drawn from N(0, 1/r), B zero; loftq (4-bit bases): A and B fitted to the quantization error, so
    the 4-bit base plus the adapter starts at the 16-bit model (LoftQ: the rank-r SVD of the original weights
    minus their NF4 dequantization; one pass, the base unchanged); pissa, olora (16-bit bases): A and B from the
    weights' principal singular vectors (PiSSA) or a QR decomposition (OLoRA), the base holding the residual
    while training; the saved adapter is converted to an ordinary LoRA of rank 2r on the original base, so the
    merge, the export and the registry name the original base."""

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("target_modules is empty: name modules (e.g. [query, value]) or use all-linear")
        return v

    @property
    def drops_inputs(self) -> bool:
        """Whether the adapters train on dropped-out inputs (each keeps its own copy for backward)."""
        return self.enabled and self.lora_dropout > 0


class TrainSection(Section):
    num_train_epochs: float = Field(1.0, gt=0)
    """Passes over the training data (fractions allowed); see max_steps."""
    max_steps: int = Field(-1, le=MAX_STEPS)
    """Optimizer steps to train; when set (1 or more) it overrides num_train_epochs; -1: unset."""
    learning_rate: float = Field(2e-4, gt=0)
    """Peak learning rate."""
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup",
                               "cosine_with_restarts", "polynomial"] = "linear"
    """The learning-rate schedule after warm-up (transformers' schedulers)."""
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    """Fraction of the optimizer steps spent warming the learning rate up from 0."""
    per_device_train_batch_size: int = Field(16, gt=0)
    """Examples (packed rows with packing) per micro-batch; times gradient_accumulation_steps, the examples per
    optimizer step."""
    per_device_eval_batch_size: int = Field(64, gt=0)
    """Rows per batch in validation and evaluation."""
    gradient_accumulation_steps: int = Field(1, gt=0)
    """Micro-batches accumulated per optimizer step."""
    gradient_checkpointing: bool = False
    """Recompute each layer in backward instead of keeping its activations (non-reentrant): less memory, about
    a third more compute."""
    offload_activations: bool = False
    """Keep the tensors saved for backward (checkpointed layer inputs, logits) in pinned CPU memory (CUDA
    only): about a GiB less GPU memory on a 7B model at sequence 2048, for some speed."""
    max_memory_gib: Optional[float] = Field(None, gt=0)
    """A GPU memory budget: the fastest set-up whose estimated peak fits it is chosen (largest micro-batch, the
    rest of per_device_train_batch_size x gradient_accumulation_steps accumulated; then checkpointing only as
    many layers as needed; then offload). The examples per optimizer step never change."""
    fused_lora: bool = True
    """Each LoRA layer as one autograd function: the same arithmetic as peft's, fewer kernels and saved
    tensors."""
    compile: Literal["auto", True, False] = "auto"
    """torch.compile each transformer layer (the first steps pay the compile, tens of seconds). auto: on CUDA
    where Triton is installed, not on the CPU; true: also on the CPU (needs a C++ compiler)."""
    kernels: Literal["auto", "liger", "none"] = "auto"
    """Liger's Triton kernels on CUDA (its fused linear cross-entropy; RMSNorm and SwiGLU where layers are not
    compiled). auto: where installed and supported; liger: wanted (warns, or fails with require_fast_paths,
    where missing); none."""
    attention: Literal["auto", "sdpa", "flash_attention_2", "flex_attention", "eager"] = "auto"
    """The attention kernel. auto: flash-attn where installed on CUDA, else PyTorch SDPA."""
    require_fast_paths: bool = False
    """A fast path asked for (kernels: liger, attention: flash_attention_2, compile: true) that the machine
    lacks fails the run instead of warning and falling back."""
    optim: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd"] = "adamw_torch"
    """The optimizer: torch's AdamW or SGD, or bitsandbytes' 8-bit and paged AdamW (paged: optimizer state can
    spill to CPU memory instead of failing on a spike)."""
    weight_decay: float = Field(0.0, ge=0)
    """Decoupled weight decay of the trained weights."""
    max_grad_norm: float = Field(1.0, ge=0)
    """Clip the gradient norm to this; 0: no clipping."""
    seed: int = Seed
    """Seed of the adapters' initialisation, data order, dropout and packing."""
    group_by_length: bool = True
    """Batches of rows of similar length: far less padding with dynamic padding."""
    logging_steps: int = Field(10, gt=0)
    """Log train loss, learning rate, gradient norm and speed every this many optimizer steps."""
    eval_steps: Optional[int] = Field(None, gt=0)
    """Validate every this many optimizer steps; default: at the end of each epoch."""
    save_steps: int = Field(100, gt=0)
    """Checkpoint every this many optimizer steps (resumable after a crash or a signal)."""
    save_total_limit: int = Field(2, gt=0)
    """Checkpoints kept; older ones are deleted."""

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, v):
        if v != -1 and v < 1:
            raise ValueError("must be a number of optimizer steps (1 or more), or -1 to train num_train_epochs")
        return v

    # How fast and in how much memory, not what is computed: left out of the train stage's cache key,
    # so a run stopped (say, out of memory) resumes under a new budget.
    NOT_IN_CACHE_KEY: ClassVar[tuple[str, ...]] = (
        "gradient_checkpointing", "offload_activations", "max_memory_gib", "fused_lora", "kernels", "attention",
        "require_fast_paths", "save_steps", "save_total_limit")



class DistributedSection(Section):
    """How many processes train (torchrun). Not part of any cache key or of the MLflow run's identity:
    the same recipe on 1, 2 or 8 GPUs is the same experiment."""
    strategy: Literal["auto", "ddp", "fsdp", "none"] = "auto"
    """ddp: every process holds the model and trains on its share of each optimizer step's examples,
    the adapter's gradients averaged over the processes once per step (an all-reduce); fsdp: the
    same, with the weights (4-bit included), the adapter and its optimizer state sharded over the
    processes (FSDP2, each decoder layer gathered when it runs), for models a single GPU cannot
    hold; none: one process; auto: with more than one process, ddp when the model and its training
    state fit one GPU (the memory estimate against the GPU's free memory), else fsdp."""
    nproc_per_node: Union[Literal["auto"], int] = "auto"
    """Processes on each node; auto: one per visible GPU (one on a CPU machine)."""
    nnodes: int = Field(1, gt=0)
    """Machines taking part; each runs the same command (see docs/scaling.md)."""
    rdzv_endpoint: Optional[str] = None
    """HOST:PORT where the nodes' torchrun agents meet (c10d rendezvous); needed with nnodes above 1."""
    rdzv_timeout_s: float = Field(900, gt=0)
    """How long the nodes' agents wait for each other at the rendezvous before the run fails, naming
    the endpoint."""
    cpu_offload: bool = False
    """fsdp: keep the sharded weights and optimizer state in CPU memory, each layer copied to the GPU
    when it runs (slower; for models whose shards do not fit the GPUs)."""
    max_restarts: int = Field(0, ge=0)
    """Times torchrun restarts the workers after one fails (each restart resumes from the last
    checkpoint)."""

    @field_validator("nproc_per_node")
    @classmethod
    def _positive(cls, v):
        if v != "auto" and v < 1:
            raise ValueError("must be auto or at least 1")
        return v

    @model_validator(mode="after")
    def _rendezvous(self):
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("nnodes above 1 needs rdzv_endpoint (HOST:PORT of the rendezvous every node's "
                             "agent reaches)")
        if self.rdzv_endpoint is not None:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"rdzv_endpoint must be HOST:PORT, got {self.rdzv_endpoint!r}")
        if self.cpu_offload and self.strategy not in ("fsdp", "auto"):
            raise ValueError(f"cpu_offload applies to strategy fsdp, not {self.strategy}")
        if self.strategy == "none" and (self.nnodes > 1 or self.nproc_per_node not in ("auto", 1)):
            raise ValueError("strategy none trains in one process: set nproc_per_node: 1 and nnodes: 1, or "
                             "strategy ddp")
        return self

class JudgeSection(Section):
    """causal-lm: a sequence classifier (a reward model) that judges the generated answers."""
    model: Optional[SecretText] = None
    """models:/NAME/VERSION or models:/NAME@ALIAS in this recipe's tracking store (e.g. the quickstart recipe's
    classifier, quickstart-merged@champion), or a local directory or package: path. None: no judging."""
    label: Optional[str] = None
    """The class that counts as a good answer (e.g. fresh). Logged: the share of answers judged so, the mean
    probability, and the tuned model's win rate against the starting model on the same prompts."""

    @model_validator(mode="after")
    def _label_with_model(self):
        if self.model is not None and not self.label:
            raise ValueError("evaluate.judge.label names the class that counts as a good answer (required with "
                             "evaluate.judge.model)")
        return self


class HarnessSection(Section):
    """causal-lm: EleutherAI's lm-evaluation-harness on the model the evaluate stage holds (the 4-bit base
    with the adapter, the merged model, the base before training). Needs the eval extra (lm-eval)."""
    tasks: list[str] = []
    """lm-eval task, group or tag names (e.g. [hellaswag, arc_easy], or tasks defined under include_path).
    Empty: no harness."""
    include_path: Optional[str] = None
    """A directory of lm-eval task YAML files (local tasks over local JSON/CSV files: offline). Paths inside
    them are as lm-eval reads them: absolute, or relative to the working directory."""
    num_fewshot: Optional[int] = Field(None, ge=0)
    """Few-shot examples per question; None: each task's own default."""
    limit: Optional[int] = Field(None, gt=0)
    """At most this many examples per task (a quicker, rougher figure); None: all."""
    batch_size: int = Field(8, gt=0)
    """Requests per forward pass."""
    bootstrap_iters: int = Field(1000, ge=0)
    """Bootstrap resamples for the standard errors of metrics that need them (0: none)."""

    @property
    def enabled(self) -> bool:
        return bool(self.tasks)


class EvaluateSection(Section):
    metrics: Optional[list[str]] = None
    """Metric modules under tasks/metrics/ by name (accuracy, f1, precision, recall, rouge; f1, precision and
    recall macro and per class), or paths to evaluate-compatible metric scripts. Default: accuracy, f1,
    precision, recall (classification); rouge (causal-lm, on generations)."""
    trust_metric_code: bool = False
    """Let evaluate.metrics name your own metric scripts (Python files, run as code: only scripts you
    trust). Off: only the bundled metrics."""
    generation: GenerationSection = GenerationSection()
    """causal-lm: generated answers for held-out prompts."""
    judge: JudgeSection = JudgeSection()
    """causal-lm: a classifier that judges the generated answers (sampled ones when generation.temperature is
    set, else greedy)."""
    harness: HarnessSection = HarnessSection()
    """causal-lm: lm-evaluation-harness tasks, logged as harness.<task>.<metric> (and _stderr) per variant."""

    def metric_names(self, task: str) -> list[str]:
        if self.metrics is not None:
            return self.metrics
        return ["rouge"] if task == "causal-lm" else ["accuracy", "f1", "precision", "recall"]


MergeBase = Literal["dequantized", "original"]


class MergeSection(Section):
    enabled: bool = True
    """Merge the adapter into a 16-bit model, evaluated and registered beside the adapter."""
    base: MergeBase = "dequantized"
    """The merged model to ship (logged and registered): dequantized: the 4-bit base dequantized, then merged
    (exactly what training saw); original: the original 16-bit base reloaded, then merged."""
    dtype: DType = "bfloat16"
    """the dtype the merged model is saved in"""
    compare: bool = False
    """Also build and measure every variant side by side: adapter, merged-dequant, merged-original and
    merged-4bit (the merge re-quantized to NF4, as peft's merge into a 4-bit model gives)."""


class PromotionSection(Section):
    enabled: bool = False
    """After each run, point the registry's `champion` alias at the new candidate only if it beats the
    champion's run on `metric` by more than `margin` (scheduled retraining turns this on)."""
    metric: Optional[str] = None
    """A metric the run logs (test_*, merged_test_*). Default: the promoted model's own figure, accuracy for a
    classifier and loss (mode min) for a causal LM, of the merged model (merged_test_*) when that is what is
    promoted."""
    mode: Optional[Literal["max", "min"]] = None
    """Which way is better; default: min for losses and perplexity, else max."""
    margin: float = Field(default=0.0, ge=0)
    """How much the candidate must beat the champion by."""
    model: Optional[Literal["merged", "adapter"]] = None
    """Which registered model is promoted; default: the merged model when the recipe merges."""

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


# MLflow keeps registered model names and metric keys to 250 characters; Prefect's asset keys
# (qlora://NAME/merged-model) to 512. Room for the -adapter / -merged suffixes.
MAX_NAME_LENGTH = 200
MAX_EXPERIMENT_NAME_LENGTH = 500  # MLflow's limit


def registry_name(value: str | None) -> str | None:
    """What MLflow accepts as a registered model name, and what `NAME@ALIAS` and the registry's
    filter strings can carry."""
    if value is None:
        return value
    if not value.strip() or value != value.strip():
        raise ValueError("must be a non-empty name without leading or trailing spaces")
    bad = sorted({c for c in value if c in "/:@?'\"\\" or not c.isprintable()})
    if bad:  # '?' would start the query of a models:/NAME/VERSION URI
        raise ValueError(f"cannot contain {' '.join(repr(c) for c in bad)} (MLflow registered model names and "
                         f"NAME@ALIAS and models:/ references)")
    if value in (".", ".."):
        raise ValueError("is not a name")
    if len(value) > MAX_NAME_LENGTH:
        raise ValueError(f"at most {MAX_NAME_LENGTH} characters, got {len(value)} (it names registered models, "
                         f"NAME-adapter and NAME-merged, and Prefect assets)")
    return value


class TrackingSection(Section):
    experiment_name: str = "qlora"
    """The MLflow experiment the runs go to."""
    tracking_uri: Optional[SecretText] = None
    """Default: the local sqlite store under mlflow/ in the current directory. Credentials in it
    (`https://user:password@host`) are used, never shown; or give them as MLflow takes them, in
    MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD."""
    register_models: bool = True
    """Register the adapter and the merged model in the MLflow model registry (each new version gets the alias
    candidate)."""
    registered_model_name: Optional[str] = None
    """The registry names are NAME-adapter and NAME-merged; default: the recipe name."""
    promotion: PromotionSection = PromotionSection()
    """Champion promotion after each run."""

    @field_validator("experiment_name")
    @classmethod
    def _experiment(cls, v):
        if not v.strip():
            raise ValueError("must be a non-empty name")
        if len(v) > MAX_EXPERIMENT_NAME_LENGTH:
            raise ValueError(f"at most {MAX_EXPERIMENT_NAME_LENGTH} characters (MLflow's limit), got {len(v)}")
        if not v.isprintable():
            raise ValueError("cannot contain control characters (newline, tab, NUL)")
        return v

    _registered = field_validator("registered_model_name")(registry_name)


class Recipe(Section):
    name: str
    """Names the MLflow runs and registered models; default: the recipe file's stem."""
    description: Optional[SecretText] = Field(None, max_length=20_000)
    """Free text, logged with the run (at most 20,000 characters)."""
    model: ModelSection
    """The base model."""
    data: DataSection
    """The dataset and how to read and clean it."""
    split: SplitSection = SplitSection()
    """Train/validation/test splits the source lacks."""
    tokenize: TokenizeSection = TokenizeSection()
    """How rows become tokens."""
    prompt: PromptSection = PromptSection()
    """causal-lm: how a row becomes a prompt and a response."""
    preference: PreferenceSection = PreferenceSection()
    """causal-lm: preference tuning (DPO, IPO, ORPO, SimPO, KTO) instead of supervised fine-tuning."""
    quantization: QuantizationSection = QuantizationSection()
    """How the base is loaded (bitsandbytes' BitsAndBytesConfig fields)."""
    lora: LoraSection = LoraSection()
    """The adapters (peft's LoraConfig fields)."""
    train: TrainSection = TrainSection()
    """The training loop (transformers' TrainingArguments names)."""
    distributed: DistributedSection = DistributedSection()
    """Training on several GPUs or machines."""
    evaluate: EvaluateSection = EvaluateSection()
    """Test-split metrics."""
    merge: MergeSection = MergeSection()
    """The merged model."""
    tracking: TrackingSection = TrackingSection()
    """MLflow tracking, registry and promotion."""
    work_dir: str = ".qlora"
    """Where stage artifacts live (content-addressed), relative to the current directory."""

    _name = field_validator("name")(registry_name)

    @model_validator(mode="after")
    def _full_finetuning_needs_16bit(self):
        if not self.lora.enabled and self.quantization.mode != "none":
            raise ValueError("full fine-tuning (lora.enabled: false) trains every weight and needs an unquantized "
                             "base: set quantization.load_in_4bit: false")
        return self

    @model_validator(mode="after")
    def _what_fsdp_cannot_combine_with(self):
        if self.distributed.strategy != "fsdp":
            return self
        if self.train.optim not in ("adamw_torch", "sgd"):
            raise ValueError(f"distributed.strategy fsdp cannot step train.optim {self.train.optim} (bitsandbytes "
                             f"steps whole tensors, FSDP holds shards): set train.optim: adamw_torch, whose state "
                             f"is sharded too")
        return self

    @model_validator(mode="after")
    def _task_fields(self):
        if self.tokenize.packing and self.model.task != "causal-lm":
            raise ValueError("tokenize.packing is for causal-lm models")
        if self.preference.enabled:
            if self.model.task != "causal-lm":
                raise ValueError(f"preference.loss {self.preference.loss} tunes a causal-lm model (model.task)")
            if self.tokenize.packing:
                raise ValueError("tokenize.packing cannot pack preference pairs (each pair's completions share "
                                 "their prompt): set it to false")
            if self.prompt.train_on_prompt:
                raise ValueError("prompt.train_on_prompt: preference losses score the completions only")
        if self.evaluate.judge.model is not None and self.model.task != "causal-lm":
            raise ValueError("evaluate.judge judges generated answers: a causal-lm model's (model.task)")
        init = self.lora.init
        if init == "loftq" and not self.quantization.load_in_4bit:
            raise ValueError("lora.init: loftq fits the adapter to the 4-bit quantization error of the base, and "
                             "quantization.load_in_4bit is false (a 16-bit base has none)")
        if init in ("pissa", "olora") and (self.quantization.load_in_4bit or self.quantization.load_in_8bit):
            raise ValueError(f"lora.init: {init} replaces the base weights by their residual, which a bitsandbytes "
                             f"base cannot hold without re-quantizing it (peft refuses PiSSA there; for OLoRA the "
                             f"merge would no longer be what training saw): use a 16-bit base "
                             f"(quantization.load_in_4bit: false), or loftq for a 4-bit one")
        if init in ("loftq", "pissa", "olora") and self.lora.use_dora:
            raise ValueError(f"lora.init: {init} with lora.use_dora: DoRA's magnitudes are computed from the base "
                             f"before the adapter is initialised, so they would not match a non-zero start")
        if init != "default" and not self.lora.enabled:
            raise ValueError(f"lora.init: {init} initialises adapters, and lora.enabled is false")
        if self.evaluate.harness.enabled and self.model.task != "causal-lm":
            raise ValueError("evaluate.harness.tasks: lm-evaluation-harness evaluates causal-lm models, and "
                             f"model.task is {self.model.task}")
        return self

    def with_secrets(self, **dump_options) -> dict:
        """The recipe as a JSON-like dict with its secret-bearing fields real, not masked: for copies
        this process derives or hashes (overrides, sweep trials, method variants, the run's key),
        never for anything written or logged."""
        return self.model_dump(mode="json", context=REVEALING, **dump_options)

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


MAX_NESTING = 50  # a recipe is a few levels deep; deeper is a generated or hostile file


class RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing what would silently lose a setting or exhaust the stack: a key
    given twice in one mapping (the second `train:` would replace the whole first section), and
    nesting deeper than MAX_NESTING."""

    depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_NESTING:
                raise yaml.constructor.ConstructorError(None, None, f"nested more than {MAX_NESTING} levels deep",
                                                        self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`, then keys overriding them
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
                seen[key] = line
            except TypeError:  # an unhashable key: the base class says so
                break
            if first is not None:
                where = f"lines {first} and {line}" if first != line else f"line {line}"
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {shorten(str(key), 60)!r} given twice ({where}): the second would replace "
                                f"the first", key_node.start_mark)
        return super().construct_mapping(node, deep)


def read_yaml(text: str) -> Any:
    """YAML text as Python values, through RecipeLoader."""
    loader = RecipeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"--set expects KEY=VALUE, got {text!r}", hint="e.g. --set train.learning_rate=1e-3")
    key, raw = text.split("=", 1)
    try:
        value = read_yaml(raw) if raw.strip() else None
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
        raw = read_yaml(path.read_text(encoding="utf-8"))
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
