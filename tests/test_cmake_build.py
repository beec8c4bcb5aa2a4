"""CMakeLists.txt builds the same operators into a library that torch.ops.load_library can load."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import torch, vitos_ext
from vitos_ext.reference import compact_tokens_reference, region_to_patch_mask_reference
assert vitos_ext.is_available()
boxes, box_image, grid = torch.tensor([[0.2, 0.1, 0.7, 0.4]]), torch.tensor([0]), torch.tensor([[2, 8, 12]])
assert torch.equal(vitos_ext.region_to_patch_mask(boxes, box_image, grid, 2, 1),
                   region_to_patch_mask_reference(boxes, box_image, grid, 2, 1))
hidden, keep = torch.randn(7, 3), torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.bool)
cu, pos = torch.tensor([0, 3, 7], dtype=torch.int32), torch.arange(21).view(3, 7)
got, want = vitos_ext.compact_tokens(hidden, keep, cu, pos), compact_tokens_reference(hidden, keep, cu, pos)
assert all(torch.equal(a, b) for a, b in zip(got[:4], want[:4]))
print("loaded", vitos_ext._library.__name__, torch.ops.vitos.compact_tokens.default)
"""


def test_cmake_library_loads_and_runs(tmp_path):
    build = tmp_path / "build"
    prefix = torch.utils.cmake_prefix_path
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}"],
                   check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 1)],
                   check=True, capture_output=True, text=True)
    library = build / "libvitos_ops.so"
    assert library.is_file()
    # A fresh interpreter: the pip-built vitos_ext._C must not be loaded alongside (same op namespace).
    env = dict(os.environ, VITOS_LIBRARY=str(library))
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "vitos.compact_tokens" in result.stdout


def test_isolated_builds_pin_the_installed_torch():
    """A plain `pip install .` must compile against the torch it will run with (the extension ABI follows torch)."""
    sys.path.insert(0, str(ROOT))
    try:
        import build_backend
    finally:
        sys.path.remove(str(ROOT))
    installed = importlib.metadata.version("torch")
    assert build_backend.get_requires_for_build_wheel() == ["wheel", f"torch=={installed}"]
    assert build_backend.get_requires_for_build_editable() == ["wheel", f"torch=={installed}"]
