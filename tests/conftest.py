import os
import sys

# Tests import helpers (tests/gaussian.py) as plain modules.
sys.path.insert(0, os.path.dirname(__file__))

# Tests never touch the network: make any accidental hub access fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
