"""The training engine, free of Prefect: the training run (trainer: setup, resume, the loop, save; also
each torchrun worker's entry point), the base model as it is loaded (loading), LoRA attachment (lora),
the fused LoRA layer (fused_lora), activation offload (offload), faster kernels (kernels), the memory
estimate and plan (memory), the optimizer (optimizer), one micro-batch's forward and backward (step),
resumable checkpoints (checkpoint), several processes under torchrun (distributed, fsdp). The train
stage, the GPU benchmarks and every torchrun worker run exactly this code."""
