"""The wheel holds every module under the vecpipe namespace plus man pages and completions, and
nothing imports the repo folders as top-level packages (the trap DESIGN.md names)."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_repo_folders_are_not_imported_as_top_level_packages():
    import vecpipe.formats.readers  # noqa: F401

    for top in ("cli", "commands", "formats"):
        assert top not in sys.modules, f"{top} imported as a top-level package"


def test_vecpipe_is_a_namespace_package():
    assert not (REPO / "vecpipe").exists()
    import vecpipe

    assert getattr(vecpipe, "__file__", None) is None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(REPO)], check=True, capture_output=True)
    return zipfile.ZipFile(next(out.glob("vecpipe-*.whl")))


@pytest.mark.slow
def test_wheel_contains_every_module(wheel):
    names = set(wheel.namelist())
    for folder, package in (("cli", "cli"), ("commands", "commands"), ("core", "core"),
                            ("formats", "formats")):
        for source in (REPO / folder).glob("*.py"):
            assert f"vecpipe/{package}/{source.name}" in names, source
    assert "vecpipe/__init__.py" not in names


def test_wheel_ships_man_pages_and_completions(wheel):
    names = wheel.namelist()
    for page in (REPO / "man").glob("*.1"):
        assert any(n.endswith(f"share/man/man1/{page.name}") for n in names), page.name
    for comp in ("vecpipe.bash", "_vecpipe", "vecpipe.fish"):
        assert any(n.endswith(comp) for n in names), comp


def test_installed_console_script_runs_outside_the_repo(tmp_path):
    out = subprocess.run([str(Path(sys.executable).parent / "vecpipe"), "--version"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    probe = subprocess.run([sys.executable, "-c", "import formats"], capture_output=True,
                           cwd=tmp_path)
    assert probe.returncode != 0


def _pins() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


def test_every_dependency_is_pinned_in_constraints():
    """Numbers must not change because PyPI served a newer release: every dependency the
    project names, extras included, has an exact pin that `make install` uses."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    named = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        named += extra
    pins = _pins()
    unpinned = {canonicalize_name(Requirement(spec).name) for spec in named} - set(pins)
    assert not unpinned, f"pin these in constraints.txt: {sorted(unpinned)}"
    assert "-c constraints.txt" in (REPO / "Makefile").read_text()


def test_installed_versions_are_the_pinned_ones():
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    wrong = {}
    for name, pinned in _pins().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue  # an extra this environment did not install
        if Version(installed).public != Version(pinned).public:
            wrong[name] = (installed, pinned)
    assert not wrong, f"installed != constraints.txt: {wrong}"
