"""modules/sd_models.py (v1.10.1): model_path (models/Stable-diffusion) and list_models (the checkpoint list's
refresh), counted. Forge's (dfdcbab6) also: model_data.sd_model, forge_model_reload() -> (sd_model, reloaded) (Forge
loads the selected checkpoint at the first generation; here a test sets model_data.sd_model)."""
import types

model_path = ""
refreshes = 0
model_data = types.SimpleNamespace(sd_model=None)
reloads = []


def list_models():
    global refreshes
    refreshes += 1


def forge_model_reload():
    reloads.append(model_data.sd_model)
    return model_data.sd_model, False
