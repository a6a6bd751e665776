"""modules/sd_models.py (v1.10.1): model_path (models/Stable-diffusion) and list_models (the checkpoint list's
refresh), counted."""
model_path = ""
refreshes = 0


def list_models():
    global refreshes
    refreshes += 1
