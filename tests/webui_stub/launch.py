"""launch.py (v1.10.1, from launch_utils): is_installed(package), run_pip(command, desc=None, live=...)."""
installed = set()
pip_calls = []


def is_installed(package):
    return package in installed


def run_pip(command, desc=None, live=False):
    pip_calls.append(command)
