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
    """README leads to the code within 220 lines (one row per concept); every relative link in it
    and in docs/ resolves, markdown's and an <img>'s src, anchors included (a moved section or
    picture would otherwise leave a dead link)."""
    import re
    assert len(read("README.md").splitlines()) <= 220
    pages = ["README.md"] + [f"docs/{name}" for name in sorted(os.listdir(os.path.join(REPO,
                                                                                       "docs")))]
    for page in pages:
        text = read(page)  # markdown links, and the src of HTML's <img>
        for target in re.findall(r"\]\(([^)]+)\)", text) + re.findall(r'src="([^"]+)"', text):
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


# A paper citation: its kind, then one number ("Fig. 3a", "Sec. 4.2.2", "App. B.1", "Table 2",
# "Eq. 3"), or several after a plural or an "and" ("Figs. 3 and 4", "Sec. 2.2 and 3.2").
_KIND = {"Fig": "Fig.", "Figure": "Fig.", "Sec": "Sec.", "Section": "Sec.", "§": "Sec.",
         "Table": "Table", "App": "App.", "Appendix": "App.", "Eq": "Eq.", "Equation": "Eq."}
_NUMBER = r"(?:[A-Z](?:\.\d+)+|\d+(?:\.\d+)*[a-z]?)"
_CITATION = (r"(?<![\w.])(Fig|Figure|Sec|Section|§|Table|App|Appendix|Eq|Equation)(s?)\.? ?("
             + _NUMBER + r"(?:(?:,| and| or) " + _NUMBER + r")*)")
# Narayanan et al.'s Fig. 3 is the GPipe schedule alone; 1F1B is Fig. 4, top (docs/papers.md).
_WRONG = r"Figs?\. 3,? \(?(top|bottom)\b"


def _citations(text):
    """Every paper number `text` cites, as "Fig. 3a"; comment marks at line starts dropped, so
    a citation broken over two lines of a comment or a docstring is read whole."""
    import re
    text = " ".join(re.sub(r"\n\s*#+", "\n", text).split())
    found = set()
    for kind, plural, numbers in re.findall(_CITATION, text):
        if not plural:  # "Sec. 3, 2 all-reduces": after a singular kind, only "and" continues
            numbers = numbers.split(",")[0]
        found.update(f"{_KIND[kind]} {n.strip()}" for n in re.split(r",| and| or", numbers))
    return found, re.findall(_WRONG, text)


def test_every_paper_number_cited_is_in_docs_papers_md():
    """Each figure, section, table, equation and appendix a tracked .py, .md or .sh file cites is
    a row of docs/papers.md (a wrong number is a new one, or one its paper does not have), each
    file a row names still cites that number, and 1F1B is not cited as Narayanan's Fig. 3."""
    import re
    import subprocess
    rows = {}
    for line in read("docs/papers.md").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and _citations(cells[1])[0] == {cells[1]}:
            rows.setdefault(cells[1], set()).update(re.findall(r"`([^`]+)`", cells[3]))
    assert len(rows) > 20, "docs/papers.md: its table was not read"
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    cited, problems = {}, []
    for path in sorted(set(listed)):
        if (not path.endswith((".py", ".md", ".sh")) or path.startswith(".venv/")
                or not os.path.isfile(os.path.join(REPO, path))):
            continue
        cited[path], wrong = _citations(read(path))
        problems += [f"{path} cites {c}, which docs/papers.md does not list"
                     for c in sorted(cited[path] - set(rows))]
        problems += [f"{path} cites Fig. 3, {w}: Narayanan et al.'s Fig. 3 is GPipe alone, "
                     "1F1B is Fig. 4, top, the interleaved 1F1B Fig. 4, bottom" for w in wrong]
    for number, paths in rows.items():
        problems += [f"docs/papers.md: {path} no longer cites {number}"
                     for path in sorted(paths) if number not in cited.get(path, ())]
    assert not problems, "\n".join(problems)


def test_training_package_docstring_names_every_module():
    """training/__init__.py's docstring is the package's table of contents: every module in it."""
    import ast
    names = ast.get_docstring(ast.parse(read("training/__init__.py"))).split()
    modules = sorted(name for name in os.listdir(os.path.join(REPO, "training"))
                     if name.endswith(".py") and name != "__init__.py")
    missing = [module for module in modules if module not in names]
    assert modules and not missing, f"training/__init__.py's docstring does not name {missing}"
