"""modules/paths.py (v1.10.1, from paths_internal): data_path."""
data_path = ""
