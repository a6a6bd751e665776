"""modules_forge (Forge's package beside modules/): only its presence is read."""
