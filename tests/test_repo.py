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


def test_readme_main_job_ends_with_pictures_and_report():
    main_job = [line for line in read("README.md").splitlines() if "bash bash_parallel_train.sh &&" in line]
    assert main_job and main_job[0].startswith("bash scripts/setup.sh")
    assert main_job[0].endswith("python plot_runs.py && python compare_runs.py")


def test_requirements_pin_torch():
    # An unpinned torch pulls whatever is newest; the pin keeps GPU users on the tested build.
    assert "torch==2.13.0" in read("requirements.txt").splitlines()
