"""The README's Python examples run as written."""
import os
import re

import pytest

from conftest import REPO

BLOCKS = re.findall(r"```python\n(.*?)```", open(os.path.join(REPO, "README.md")).read(),
                    flags=re.S)


def test_readme_has_the_module_and_sparsify_examples():
  assert len(BLOCKS) >= 2
  assert "SparseMlp" in BLOCKS[0] and "sparse_jax.sparsify" in BLOCKS[1]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_example_runs(index, capsys):
  namespace = {}
  exec(compile(BLOCKS[index], "README.md", "exec"), namespace)  # pylint: disable=exec-used
  density = float(capsys.readouterr().out.strip().splitlines()[-1])
  assert 0.0 < density <= 1.0  # Each example ends by printing an activation density.
  if "optax" in BLOCKS[index]:
    assert "tx" in namespace  # The optimizer the example builds.
