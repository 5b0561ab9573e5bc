"""Generated man pages and completions are current: run `make man` when this fails."""
from pathlib import Path

import pytest

from vecpipe.cli.docgen import generate

REPO = Path(__file__).resolve().parent.parent
GENERATED = generate()


@pytest.mark.parametrize("rel", sorted(GENERATED))
def test_generated_file_is_fresh(rel):
    path = REPO / rel
    assert path.is_file(), f"{rel} missing: run `make man`"
    assert path.read_text() == GENERATED[rel], f"{rel} is stale: run `make man`"


def test_no_orphan_man_pages():
    on_disk = {f"man/{p.name}" for p in (REPO / "man").glob("*.1")}
    assert on_disk == {k for k in GENERATED if k.startswith("man/")}


def test_readme_mentions_every_command():
    from vecpipe.cli.app import COMMANDS

    readme = (REPO / "README.md").read_text()
    for name, _ in COMMANDS:
        assert f"vecpipe {name}" in readme, f"README has no tour entry for {name}"


def test_the_architecture_names_every_module():
    """docs/architecture.md is the map of the tree: a module it does not name is a drift."""
    text = (REPO / "docs" / "architecture.md").read_text()
    missing = [f"{folder}/{path.name}" for folder in ("cli", "commands", "core", "formats")
               for path in sorted((REPO / folder).glob("*.py"))
               if path.name not in ("__init__.py", "__main__.py") and path.name not in text]
    assert not missing, f"docs/architecture.md does not name: {', '.join(missing)}"
