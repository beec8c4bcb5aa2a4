import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # anchors.py

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
