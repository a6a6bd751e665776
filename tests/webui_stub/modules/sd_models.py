"""modules/sd_models.py as Forge has it (dfdcbab6): model_data.sd_model, forge_model_reload() -> (sd_model, reloaded)
(Forge loads the selected checkpoint at the first generation; here a test sets model_data.sd_model)."""
import types

model_data = types.SimpleNamespace(sd_model=None)
reloads = []


def forge_model_reload():
    reloads.append(model_data.sd_model)
    return model_data.sd_model, False
