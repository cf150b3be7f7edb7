"""Recipes run in order as one Prefect flow run, each a subflow (`qlora run sft.yaml dpo.yaml`): a
later recipe starts from what an earlier one produced (`model.name_or_path: models:/NAME-adapter@candidate`,
`models:/NAME-merged@candidate`, or `recipe:sft.yaml`: that recipe's latest finished run), resolved when its
turn comes. A failed recipe stops the chain."""
# No `from __future__ import annotations`: Prefect builds the flow's parameter model from these.
from typing import Any

from prefect import flow

from qlora.flows.finetune import finetune
from qlora.tasks.recipe import Recipe


@flow(name="qlora-chain", persist_result=False)
def chain(recipes: list[Recipe], recipe_files: list[str]) -> list[dict[str, Any]]:
    """Each recipe's pipeline flow, one after the other, as subflows of this flow run."""
    return [finetune(recipe, recipe_file) for recipe, recipe_file in zip(recipes, recipe_files)]


def registered_names(recipe: Recipe) -> set[str]:
    """The registered model names a run of the recipe creates (its adapter or model, and merged model)."""
    if not recipe.tracking.register_models:
        return set()
    name = recipe.tracking.registered_model_name or recipe.name
    return {f"{name}-{'adapter' if recipe.lora.enabled else 'model'}"} | \
        ({f"{name}-merged"} if recipe.merge.enabled and recipe.lora.enabled else set())
