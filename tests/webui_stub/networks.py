"""extensions-builtin/Lora/networks.py (v1.10.1): loaded_networks, network_restore_weights_from_backup,
list_available_networks."""
loaded_networks = []
refreshes = 0


def network_restore_weights_from_backup(self):
    backup = getattr(self, "network_weights_backup", None)
    if backup is not None:
        self.weight.copy_(backup)


def list_available_networks():
    global refreshes
    refreshes += 1
