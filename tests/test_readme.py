"""The manual's Python examples run as written, and its links lead somewhere.

The manual is README.md (the front page) and the pages in docs/. Every ```python block
in them is executed, each in a fresh namespace (blocks share no state), and must end by
printing an activation density in (0, 1] as its last line of output: that is how the
examples show the method at work. A block that demonstrates something else says so, with
a reason, on the last non-blank line before its fence:

    <!-- example: no density: prints the spectral ratio, not a density -->
    ```python

and must still run. Code that is not meant to run (a fragment using names it does not
define) goes in a plain ``` fence, without a language.
"""
import dataclasses
import glob
import os
import re

import pytest

from conftest import REPO

NO_DENSITY = re.compile(r"^<!--\s*example:\s*no density:\s*(?P<reason>\S.*?)\s*-->$")
FENCE = re.compile(r"^(?P<fence>```+|~~~+)\s*(?P<lang>\S*)")

# Pages that other parts of the work add, linked from README.md ahead of them: a link to
# one of these may dangle while the page does not exist; once it exists it is checked
# like any other.
PENDING_PAGES = {"docs/study.md", "docs/validation.md", "docs/metrics.md"}


def manual_files() -> list[str]:
  """README.md and docs/*.md, as paths relative to the repository root."""
  docs = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
  return ["README.md"] + docs


@dataclasses.dataclass(frozen=True)
class Block:
  path: str           # Relative to the repository root.
  index: int          # 1-based, among the file's python blocks.
  line: int           # Line of the block's first code line in the file.
  code: str
  no_density: str | None  # The reason given in a `no density` marker, else None.


@dataclasses.dataclass(frozen=True)
class Fence:
  path: str
  line: int           # Line of the opening fence.
  lang: str
  body: list[str]
  before: str         # The last non-blank line before the fence.


def fences(path: str) -> list[Fence]:
  """The fenced code blocks of one markdown file, in order."""
  lines = open(os.path.join(REPO, path), encoding="utf-8").read().split("\n")
  found, i, before = [], 0, ""
  while i < len(lines):
    match = FENCE.match(lines[i].strip())
    if not match:
      if lines[i].strip():
        before = lines[i].strip()
      i += 1
      continue
    start, closing = i, match["fence"]
    i += 1
    while i < len(lines) and lines[i].strip() != closing:
      i += 1
    assert i < len(lines), f"{path}:{start + 1}: code fence never closed"
    found.append(Fence(path, start + 1, match["lang"], lines[start + 1:i], before))
    before, i = "", i + 1
  return found


def python_blocks() -> list[Block]:
  blocks = []
  for path in manual_files():
    python = [f for f in fences(path) if f.lang == "python"]
    for index, fence in enumerate(python, 1):
      marker = NO_DENSITY.match(fence.before)
      blocks.append(Block(path, index, fence.line + 1, "\n".join(fence.body) + "\n",
                          marker["reason"] if marker else None))
  return blocks


BLOCKS = python_blocks()


def test_the_module_sparsify_and_kernel_examples_are_there():
  """The front page's promises have examples: SparseMlp, sparsify, the Pallas op; and
  docs/sparsify.md's NNX training and t5x-style (own dense class) examples run."""
  for needle in ("SparseMlp(", "sparse_jax.sparsify(", "MlpKernel(impl=\"pallas\""):
    assert any(needle in b.code and b.no_density is None for b in BLOCKS), needle
  page = [b for b in BLOCKS if b.path == "docs/sparsify.md" and b.no_density is None]
  for needles in (("nnx.Optimizer(", "sparse_jax.sparsify(", "nnx.capture("),
                  ("class DenseGeneral(nn.Module)", "sparse_jax.sparsify(")):
    assert any(all(n in b.code for n in needles) for b in page), needles


def test_python_code_is_fenced_as_python():
  """A block fenced ```py or ```python3 would silently not run; ``` or ```python only."""
  for path in manual_files():
    for fence in fences(path):
      assert fence.lang == "python" or not fence.lang.lower().startswith("py"), (
          f"{path}:{fence.line}: fence ```{fence.lang}: write ```python (runs) or ``` "
          "(does not run)")
      if NO_DENSITY.match(fence.before):
        assert fence.lang == "python", f"{path}:{fence.line}: marker before a non-python fence"


@pytest.mark.parametrize("block", [pytest.param(b, id=f"{b.path}:{b.index}") for b in BLOCKS])
def test_python_example_runs(block, capsys):
  namespace = {}
  # Padded so that a traceback names the markdown file's own line numbers.
  code = "\n" * (block.line - 1) + block.code
  exec(compile(code, block.path, "exec"), namespace)  # pylint: disable=exec-used
  if "optax" in block.code:
    assert "tx" in namespace  # The optimizer the example builds.
  if block.no_density is not None:
    return
  output = capsys.readouterr().out.strip().splitlines()
  assert output, f"{block.path}:{block.line}: prints nothing (a density is expected last)"
  density = float(output[-1])
  assert 0.0 < density <= 1.0  # Each example ends by printing an activation density.


def github_anchor(heading: str) -> str:
  """The fragment GitHub gives a heading: lower case, punctuation dropped, - for spaces."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: str) -> set[str]:
  found, seen = set(), {}
  text = open(os.path.join(REPO, path), encoding="utf-8").read().split("\n")
  code_lines = {f.line + k for f in fences(path) for k in range(len(f.body) + 2)}
  for number, line in enumerate(text, 1):
    match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
    if match and number not in code_lines:
      anchor = github_anchor(match[1])
      count = seen.get(anchor, 0)
      seen[anchor] = count + 1
      found.add(anchor if count == 0 else f"{anchor}-{count}")
  return found


def links(path: str) -> list[tuple[int, str]]:
  """(line, target) of the relative links outside code blocks and code spans."""
  code_lines = {f.line + k for f in fences(path) for k in range(len(f.body) + 2)}
  found = []
  text = open(os.path.join(REPO, path), encoding="utf-8").read().split("\n")
  for number, line in enumerate(text, 1):
    if number in code_lines:
      continue
    for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line)):
      if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # Not http:, mailto:, ...
        found.append((number, target))
  return found


@pytest.mark.parametrize("path", manual_files())
def test_links_resolve(path):
  if path == "README.md":
    assert len(links(path)) >= 10, "the front page links every page of the manual"
  for line, target in links(path):
    file_part, _, fragment = target.partition("#")
    resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
    where = f"{path}:{line}: link {target}"
    if not os.path.exists(os.path.join(REPO, resolved)):
      assert resolved in PENDING_PAGES, f"{where}: {resolved} does not exist"
      continue
    if fragment and resolved.endswith(".md"):
      assert fragment in anchors(resolved), f"{where}: no heading #{fragment} in {resolved}"
