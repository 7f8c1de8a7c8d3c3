"""The README and docs/ pages: links resolve, every recipe is listed, the quick start agrees with its config."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "RESULTS.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(page: pathlib.Path) -> set[str]:
  """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
  out, in_code = set(), False
  for line in page.read_text().splitlines():
    if line.startswith("```"):
      in_code = not in_code
    if in_code or not line.startswith("#"):
      continue
    title = line.lstrip("#").strip().lower()
    out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
  return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
  bad = []
  for target in LINK.findall(page.read_text()):
    if re.match(r"[a-z]+://", target):
      continue
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    if not dest.exists():
      bad.append(f"{target} (no file {dest})")
    elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
      bad.append(f"{target} (no heading #{anchor} in {dest.name})")
  assert not bad, f"{page.name}: broken links: {bad}"


def test_readme_lists_every_recipe():
  readme = (ROOT / "README.md").read_text()
  missing = [p.name for p in sorted((ROOT / "configs").glob("*.py")) if f"configs/{p.name}" not in readme]
  assert not missing, f"configs missing from the README's recipe table: {missing}"


def test_quick_start_figure_matches_its_config():
  """The README's one expected number is the one the quick-start config's header states."""
  header = (ROOT / "configs" / "vit_shapes.py").read_text().split('"""')[0]
  measured = re.search(r"Measured .*?: (0\.\d+) after (\d+) steps", header, re.S)
  assert measured, "configs/vit_shapes.py header states no 'Measured ...: <acc> after <N> steps'"
  acc, steps = measured.groups()
  quick_start = (ROOT / "README.md").read_text().split("## Quick start")[1].split("\n## ")[0]
  assert f"{acc} after {steps} steps" in quick_start
  table_row = next(l for l in (ROOT / "README.md").read_text().splitlines()
                   if l.startswith("| `configs/vit_shapes.py`"))
  assert acc in table_row and f"{steps} steps" in table_row


def test_readme_is_a_short_guide_that_starts_with_install_and_test():
  lines = (ROOT / "README.md").read_text().splitlines()
  assert len(lines) <= 250
  head = "\n".join(lines[:8])
  assert 'pip install -e ".[test,torch]"' in head and "python -m pytest" in head
