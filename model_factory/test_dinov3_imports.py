"""Seed check: the seed's classes import from model_factory/ (run: python test_dinov3_imports.py)."""

import sys

print("Testing DINOv3 model imports...")
try:
    from vit_dinov3 import Dinov3

    print(f"✓ Successfully imported {Dinov3.__name__}")
    from vit_dinov3_packing_hf import DINOv3ViTPacking

    print(f"✓ Successfully imported {DINOv3ViTPacking.__name__}")
except ImportError as e:
    print(f"✗ Import failed: {e}")
    sys.exit(1)
print("\nAll imports successful!")
