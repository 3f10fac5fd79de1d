"""The README's Python example runs as written."""
import os
import re

from conftest import REPO


def test_readme_python_example_runs(capsys):
  text = open(os.path.join(REPO, "README.md")).read()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  assert blocks, "README has no python example"
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # pylint: disable=exec-used
  density = float(capsys.readouterr().out.strip().splitlines()[-1])
  assert 0.0 < density <= 1.0
  assert "tx" in namespace and "y" in namespace
