"""backend/memory_management.py (Forge dfdcbab6): load_models_gpu(models, memory_required=0), load_model_gpu(model);
loading a patcher refreshes its LoRAs (LoadedModel.model_load → refresh_loras). Records the calls."""
calls = []


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
    for m in models:
        calls.append(m)
        m.refresh_loras()


def load_model_gpu(model):
    return load_models_gpu([model])
