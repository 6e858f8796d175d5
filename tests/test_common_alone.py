"""common.py is the paper, whole, and copyable alone: torch and the standard library, no file I/O."""
import ast
import os
import shutil
import subprocess
import sys

from conftest import ROOT

SCRIPT = """
import sys, torch
import common
assert common.__file__.startswith(sys.argv[1]), common.__file__      # the copy, not the repository's
torch.manual_seed(0)
sigmas = common.geometric_sigmas(1.0, 0.01, 4)
model = common.ScoreModel(common.RefineNet(1, 4, num_classes=4, image_size=8), sigmas)
x = common.annealed_langevin_dynamics(model, torch.rand(3, 1, 8, 8), sigmas, steps_each=2)
loss = common.dsm_loss(model, torch.rand(3, 1, 8, 8), sigmas[:3]).mean()
known = torch.zeros(8, 8, dtype=torch.bool)
known[:, :4] = True
y = common.annealed_langevin_inpainting(model, torch.rand(3, 1, 8, 8), torch.rand(3, 1, 8, 8), known, sigmas,
                                        steps_each=1)
toy = common.annealed_langevin_dynamics(common.toy_score, torch.rand(500, 2) * 16 - 8,
                                        common.geometric_sigmas(20.0, 1.0, 10), steps_each=100, step_lr=0.05)
print(tuple(x.shape), bool(torch.isfinite(x).all()), loss.item() > 0, tuple(y.shape),
      float((toy.sum(1) > 0).float().mean()))
"""


def test_common_py_alone_in_an_empty_folder_imports_and_samples(tmp_path):
    shutil.copy(os.path.join(ROOT, "common.py"), tmp_path / "common.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out[:5] == ["(3,", "1,", "8,", "8)", "True"] and out[5] == "True" and out[6:10] == ["(3,", "1,", "8,", "8)"]
    assert 0.7 < float(out[10]) < 0.9                             # the toy mixture's weight 0.8 at (5, 5)


def test_common_py_imports_torch_and_the_standard_library_only_and_opens_no_file():
    tree = ast.parse(open(os.path.join(ROOT, "common.py")).read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
    assert imported <= {"math", "torch"}, imported
    calls = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert "open" not in calls
