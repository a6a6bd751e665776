"""launch.py (v1.10.1, from launch_utils): is_installed(package), run_pip(command, desc=None, live=...),
check_run_python(code) (runs ``python -c code`` in the WebUI's venv; here: False for code naming a package in
``broken``)."""
installed = set()
broken = set()
pip_calls = []
probes = []


def is_installed(package):
    return package in installed


def run_pip(command, desc=None, live=False):
    pip_calls.append(command)


def check_run_python(code: str) -> bool:
    probes.append(code)
    return not any(f"import {name}" in code for name in broken)
