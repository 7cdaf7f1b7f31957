import os
import sys

# Tests never touch the network: make any accidental hub access fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Tests import their shared helpers (tests/fakes.py) as a plain module.
sys.path.insert(0, os.path.dirname(__file__))
