"""modules/sd_hijack_checkpoint.py (v1.10.1): add(), remove()."""
stored = []


def add():
    stored.append("on")


def remove():
    stored.clear()
