"""LoRA for language models (model.task_type: text-generation): data, model, training, generation, merging."""
