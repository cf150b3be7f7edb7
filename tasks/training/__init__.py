"""The training engine, one idea per module: LoRA attachment (lora), the fused LoRA layer
(fused_lora), activation offload (offload), faster kernels (kernels), the memory estimate and plan
(memory), the optimizer (optimizer), one micro-batch's forward and backward (step), resumable
checkpoints (checkpoint), several processes under torchrun (distributed). Free of Prefect and of
the recipe schema: the training run (tasks/trainer.py), the GPU benchmarks and every torchrun worker
run exactly this code."""
