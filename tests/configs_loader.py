"""Load a config file from configs/ the way train.py does (module with get_config())."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_config_file(relative_path: str):
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
