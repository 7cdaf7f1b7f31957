import os

# Tests never touch the network: make any accidental hub access fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
