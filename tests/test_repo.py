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
    main_job = [line for line in read("README.md").splitlines()
                if "bash bash_parallel_train.sh &&" in line]
    assert main_job and main_job[0].startswith("bash scripts/setup.sh")
    assert main_job[0].endswith("python plot_runs.py && python compare_runs.py")


def test_requirements_admit_the_torches_we_tried_and_ci_installs_the_cpu_build_first():
    from packaging.requirements import Requirement
    torch = next(Requirement(line) for line in read("requirements.txt").splitlines()
                 if line.startswith("torch"))
    for tried in ("2.4.1", "2.11.0", "2.13.0"):  # CPU, an H200 with CUDA 13, CPU (README)
        assert torch.specifier.contains(tried), tried
    # untried: a range open upwards pulls whatever is newest
    assert not torch.specifier.contains("2.14.0")
    ci = read(".ci/run").splitlines()
    assert ci.index(".venv/bin/python -m pip install -q torch==2.13.0") < ci.index(TEST_COMMAND)


def test_readme_is_short_and_its_links_resolve():
    """README leads to the code within 200 lines; every relative link in it and in docs/ resolves,
    anchors included (a moved section would otherwise leave a dead link)."""
    import re
    assert len(read("README.md").splitlines()) <= 200
    pages = ["README.md"] + [f"docs/{name}" for name in sorted(os.listdir(os.path.join(REPO,
                                                                                       "docs")))]
    for page in pages:
        for target in re.findall(r"\]\(([^)]+)\)", read(page)):
            if target.startswith("http"):
                continue
            path, _, anchor = target.partition("#")
            path = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            assert os.path.exists(os.path.join(REPO,
                                               path)), f"{page} links to {target}: no such file"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", read(path), re.M)
                slugs = {re.sub(r"[^\w\- ]", "",
                                h).strip().lower().replace(" ", "-") for h in headings}
                assert anchor in slugs, f"{page} links to {target}: no such heading"


def test_every_mutant_still_applies():
    """tests/mutants.py's table stays true only while each mutant's text is in its file, once,
    and the tests it runs against exist."""
    import mutants
    for name, (path, old, _, tests) in mutants.MUTANTS.items():
        with open(os.path.join(REPO, path)) as f:
            assert f.read().count(old) == 1, f"mutant {name!r}: its text is gone from {path}"
        assert all(os.path.isfile(os.path.join(REPO, t)) for t in tests), name
