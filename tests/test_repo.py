"""The repository keeps its promises to a reader: CI runs README's test command."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_COMMAND = "bash scripts/setup.sh && . .venv/bin/activate && python -m pytest -q"


def read(path):
    with open(os.path.join(REPO, path)) as f:
        return f.read()


def test_ci_runs_the_readme_test_command():
    assert TEST_COMMAND in read("README.md")
    assert read(".ci/run").strip().splitlines()[-1] == TEST_COMMAND


def test_requirements_pin_torch():
    # An unpinned torch pulls whatever is newest; the pin keeps GPU users on the tested build.
    assert "torch==2.13.0" in read("requirements.txt").splitlines()
