"""The README is the front door: its Python blocks run as written, its links resolve, it stays short.

The quickstart loads `resnet50.safetensors`, torchvision's weights as a user saves them; here that
file holds seeded weights with torchvision's key names and shapes (`fixtures/make_torchvision_fixture.py`),
written into the directory the blocks run in."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def _text():
    with open(README) as f:
        return f.read()


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_is_a_front_door():
    text = _text()
    lines = text.splitlines()
    assert len(lines) <= 250, f"README has {len(lines)} lines: move material to docs/"
    first_screen = "\n".join(lines[:40]).lower()
    assert "own images and weights" in first_screen
    assert "make reproduce" in first_screen and "make test" in first_screen
    assert "shared/" not in text
    assert not re.search(r"\b[0-9a-f]{7,40}\b(?![^`]*`)", re.sub(r"`[^`]*`", "", text)), "commit hashes belong in docs"
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith("http"):
            assert os.path.exists(os.path.join(ROOT, target)), f"README links to missing {target}"


def test_readme_python_blocks_run_as_written(tmp_path):
    blocks = python_blocks(_text())
    assert len(blocks) >= 2
    spec = importlib.util.spec_from_file_location("make_fixture", os.path.join(ROOT, "tests", "fixtures",
                                                                               "make_torchvision_fixture.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    from safetensors.numpy import save_file

    from resnet_jax.core import weights

    save_file(gen.make_state_dict(weights.torchvision_keys("resnet50", 1000)), str(tmp_path / "resnet50.safetensors"))
    for i, block in enumerate(blocks):
        script = tmp_path / f"block{i}.py"
        script.write_text(block)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
        out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                             timeout=600)
        assert out.returncode == 0, f"README block {i} failed:\n{block}\n{out.stderr[-2000:]}"
        assert out.stdout.strip(), f"README block {i} printed nothing"
