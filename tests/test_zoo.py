"""`lpconvert zoo` shows what zoo/README.md says was measured for each recipe, digit for digit."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from lpconvert.cli import main

README = Path(__file__).resolve().parents[1] / "zoo" / "README.md"
NUMBER = re.compile(r"\d+\.\d+")


def measured_rows() -> dict[str, list[str]]:
    """Per recipe file, the numbers of zoo/README.md's lpconvert rows (base, plain, late-phase, gain columns); the
    "(reduced: …)" rows belong to the recipe above them."""
    rows: dict[str, list[str]] = {}
    recipe = None
    table = README.read_text(encoding="utf-8").split("\n\n")[2]  # the first table: recipe | model | … | source
    for line in table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        named = re.fullmatch(r"`(\w+\.yaml)`", cells[0])
        recipe = named[1] if named else recipe
        if cells[-1].startswith("lpconvert") and "not run" not in cells[-1]:
            rows.setdefault(recipe, []).extend(NUMBER.findall(" ".join(cells[3:7])))
    return rows


def test_every_recipe_with_a_result_in_the_zoo_readme_shows_it():
    output = CliRunner().invoke(main, ["zoo"], catch_exceptions=False).output
    blocks: dict[str, str] = {}
    starts = [(m.group(2), m.start()) for m in re.finditer(r"^(\w+)\n  \S*zoo/(\w+\.yaml)$", output, re.MULTILINE)]
    for (name, start), (_, end) in zip(starts, [*starts[1:], ("", len(output))]):
        blocks[name] = output[start:end]
    rows = measured_rows()
    assert set(rows) >= {"cifar10_convnet.yaml", "cifar10_convnet_pretrained.yaml",
                         "cifar10_10k_scratch_resnet20.yaml", "cifar10_pretrained_resnet20.yaml"}
    for recipe, numbers in rows.items():
        lines = blocks[recipe].splitlines()
        first = next(i for i, line in enumerate(lines) if line.startswith("  measured:"))
        measured = "\n".join([lines[first], *(line for line in lines[first + 1:] if line.startswith("    "))])
        missing = [n for n in numbers if n not in measured]
        assert not missing, (recipe, missing)
    for recipe, block in blocks.items():  # the rest say so instead of showing a dash
        assert recipe in rows or "measured: not run yet" in block, block
