"""lora.init (default, gaussian, loftq, pissa, olora), DoRA and rsLoRA: each starts where it says, is
what the evaluate stage, the merge and the export see, and resumes; bad combinations are one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import small_recipe, stages_before_training, write_recipe
from qlora.tasks.recipe import recipe_from_dict
from qlora.tasks.train import train


def _prepared(tmp_path, **lora) -> dict:
    raw = small_recipe()
    raw["lora"].update(lora)
    raw["quantization"] = {"load_in_4bit": lora.get("init") not in ("pissa", "olora")}
    raw["train"].update(max_steps=4, save_steps=2)
    return stages_before_training(recipe_from_dict(raw), str(tmp_path / "work"))


def _train(p, work: Path, on_checkpoint=None):
    r = p["recipe"]
    return train.fn(p["tokenized"], p["quantized"], p["lora"], r.lora, r.quantization, r.train,
                    on_checkpoint=on_checkpoint, work_dir=str(work))


def _loss_of(p, model) -> float:
    """The model's loss on the validation split."""
    from transformers import AutoTokenizer

    from qlora.tasks.batches import pad_token_id
    from qlora.tasks.inference import predict_logits
    from datasets import load_from_disk

    val = load_from_disk(str(p["tokenized"].dataset_dir))["validation"]
    pad = pad_token_id(AutoTokenizer.from_pretrained(p["quantized"].original_path))
    return predict_logits(model, val, 64, pad, torch.device("cpu"))[1]


def _val_loss(p, trained) -> float:
    """The validation loss of the model the evaluate stage loads (plain peft on the stage's base)."""
    from qlora.tasks.evaluate import load_for_eval

    return _loss_of(p, load_for_eval(trained, p["quantized"], p["recipe"].quantization, trained.label_names))


def _final_eval_loss(trained) -> float:
    history = [json.loads(line) for line in Path(trained.dir, trained.history).read_text().splitlines()]
    return [h["eval_loss"] for h in history if "eval_loss" in h][-1]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_save_an_ordinary_lora_of_the_original_base(tmp_path, init):
    """Training holds the residual base; the saved adapter (rank 2r) on the original base is the same
    model: its validation loss is the one training measured at its last step."""
    p = _prepared(tmp_path, init=init)
    trained = _train(p, tmp_path / "run")
    config = json.loads((trained.weights_dir / "adapter_config.json").read_text())
    assert config["r"] == 2 * p["recipe"].lora.r and config["init_lora_weights"] is True
    assert _val_loss(p, trained) == pytest.approx(_final_eval_loss(trained), abs=1e-4)


def test_loftq_starts_the_4bit_model_at_the_16bit_one(tmp_path):
    """Each 4-bit layer plus its LoftQ adapter is the original weight less only what a rank-r adapter
    cannot hold of the quantization error (its scaling accounted for), and the whole model's logits
    are nearer the 16-bit model's than with a new (zero) adapter."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    from qlora.tasks.batches import collate
    from qlora.tasks.training.loading import load_base, load_model
    from qlora.tasks.training.lora import draw_adapter_weights, model_for_training
    from qlora.tasks.training.loftq import loftq_init
    from datasets import load_from_disk

    p = _prepared(tmp_path, init="loftq")
    r, q = p["recipe"], p["quantized"]
    labels = p["tokenized"].label_names
    rows = [load_from_disk(str(p["tokenized"].dataset_dir))["validation"][i] for i in range(16)]
    torch.manual_seed(0)
    original = load_model(q.original_path, q.task, labels, torch.float32)

    def adapted(loftq: bool):
        model = model_for_training(load_base(q, labels, r.quantization), p["lora"], r.lora, True, False)
        draw_adapter_weights(model, 0)
        if loftq:
            assert loftq_init(model, q.original_path) == 12  # 6 layers x (query, value)
        head = dict(original.named_parameters())
        with torch.no_grad():  # the same head as the original: only the body's error is compared
            for name, param in model.named_parameters():
                if "classifier" in name and "modules_to_save" in name:
                    param.copy_(head[name.replace("base_model.model.", "").replace("modules_to_save.default.", "")])
        return model.eval()

    fitted = adapted(True)
    for name, module in fitted.named_modules():
        if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), bnb.nn.Linear4bit):
            base = module.get_base_layer()
            w = dict(original.named_parameters())[name.replace("base_model.model.", "") + ".weight"].detach()
            dq = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
            delta = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
            # The best rank-r fit of the quantization error (Eckart-Young): what is left is its other singular values.
            s = torch.linalg.svdvals(w - dq)
            left = (w - dq - delta).norm() ** 2
            assert left.item() == pytest.approx((s[module.r["default"]:] ** 2).sum().item(), rel=1e-3), name
            assert left < (w - dq).norm() ** 2, name
    batch = collate(rows, 0, torch.device("cpu"))
    batch.pop("labels", None)
    with torch.no_grad():
        want = original(**batch).logits
        err_loftq = (adapted(True)(**batch).logits - want).abs().mean()
        err_plain = (adapted(False)(**batch).logits - want).abs().mean()
    assert err_loftq < err_plain, (err_loftq, err_plain)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [{"init": "loftq"}, {"init": "pissa"}, {"use_dora": True}, {"use_rslora": True},
                                  {"init": "gaussian"}], ids=["loftq", "pissa", "dora", "rslora", "gaussian"])
def test_adapter_options_resume_exactly_and_merge_to_what_was_trained(tmp_path, lora):
    """Stopped at its step-2 checkpoint, the run resumes to the uninterrupted run's adapter; the
    dequantized merge of that adapter predicts what the evaluate stage's adapter predicts."""
    from qlora.tasks.merge import merge

    p = _prepared(tmp_path, **lora)
    straight = _train(p, tmp_path / "straight")

    def crash(step):
        if step == 2:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        _train(p, tmp_path / "resumed", on_checkpoint=crash)
    resumed = _train(p, tmp_path / "resumed")
    assert resumed.resumed_from_step == 2
    from safetensors.torch import load_file

    a = load_file(str(straight.weights_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.weights_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)
    merged = merge.fn(straight, p["quantized"], p["recipe"].quantization, "dequantized", "float32",
                      work_dir=str(tmp_path / "work"))
    from qlora.tasks.training.loading import load_model

    adapter_loss = _val_loss(p, straight)
    merged_loss = _loss_of(p, load_model(str(merged.weights_dir), p["quantized"].task, straight.label_names,
                                         torch.float32))
    assert merged_loss == pytest.approx(adapter_loss, abs=2e-3), (merged_loss, adapter_loss)


@pytest.mark.parametrize("lora, quantization, expected", [
    ({"init": "loftq"}, {"load_in_4bit": False}, "lora.init: loftq fits the adapter to the 4-bit quantization error"),
    ({"init": "pissa"}, {}, "lora.init: pissa replaces the base weights by their residual"),
    ({"init": "olora"}, {"load_in_4bit": False, "load_in_8bit": True}, "lora.init: olora replaces the base weights"),
    ({"init": "loftq", "use_dora": True}, {}, "lora.init: loftq with lora.use_dora"),
    ({"init": "gaussian", "enabled": False}, {"load_in_4bit": False}, "lora.init: gaussian initialises adapters"),
    ({"init": "svd"}, {}, "lora.init"),
], ids=["loftq-16bit", "pissa-4bit", "olora-8bit", "dora-loftq", "init-without-lora", "unknown"])
def test_bad_adapter_options_are_one_line_exit_2(project, capsys, lora, quantization, expected):
    from qlora.cli import EXIT_USER_ERROR, main

    raw = small_recipe()
    raw["lora"].update(lora)
    raw["quantization"] = quantization
    write_recipe(project / "r.yaml", raw)
    before = set(project.iterdir())
    code = main(["validate", "r.yaml"])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR and len(err.strip().splitlines()) == 1 and expected in err, err
    assert set(project.iterdir()) == before


def test_dora_steps_aside_from_the_fused_layer_saying_so(tmp_path):
    """DoRA layers have no fused form: the run says so and takes peft's forward (no fused_lora among its
    fast paths); with train.require_fast_paths it fails instead, naming the field."""
    from qlora.tasks.recipe import RecipeError

    p = _prepared(tmp_path, use_dora=True)
    trained = _train(p, tmp_path / "run")
    assert not [f for f in trained.fast_paths if f.startswith("fused_lora")], trained.fast_paths
    r = p["recipe"]
    strict = r.train.model_copy(update={"require_fast_paths": True})
    with pytest.raises(RecipeError, match="DoRA layers have no fused form") as e:
        train.fn(p["tokenized"], p["quantized"], p["lora"], r.lora, r.quantization, strict, work_dir=str(tmp_path / "s"))
    assert e.value.field == "train.fused_lora"
