"""The tree a reader finds: Megatron-core's layout in miniature, the README's path one row per
concept, every function on it a screen long, and each collective one hop from the operation."""

import ast
import glob
import os
import re

import pytest

from distributed import REPO

# The original's files, the second model and a user's tools: the root holds these and no more.
ROOT = {"prepare_data.py", "model.py", "parallel_layers.py", "train.py", "parallel_train.py",
        "transformer.py", "plot_runs.py", "compare_runs.py", "draw_diagram.py",
        "merge_checkpoint.py"}
# megatron/core/X -> core/X, for each of Megatron's ideas this repository holds.
MEGATRON_PATHS = ["core/parallel_state.py", "core/tensor_parallel/mappings.py",
                  "core/tensor_parallel/cross_entropy.py", "core/tensor_parallel/random.py",
                  "core/pipeline_parallel/schedules.py",
                  "core/pipeline_parallel/p2p_communication.py",
                  "core/distributed/finalize_model_grads.py",
                  "core/distributed/param_and_grad_buffer.py",
                  "core/optimizer/distrib_optimizer.py", "core/transformer/moe/router.py",
                  "core/transformer/moe/token_dispatcher.py", "core/transformer/moe/experts.py",
                  "core/transformer/moe/moe_layer.py", "core/transformer/moe/moe_utils.py"]
CONCEPTS = 14  # README's rows: f and g ... the group layout (issue 36's list), context
# parallelism, the overlapped gradient buckets, mixture of experts


def _read(path):
    with open(os.path.join(REPO, path)) as f:
        return f.read()


def _modules():
    """{module name: path} of every Python module of the repository's own code."""
    paths = [os.path.relpath(p, REPO) for p in
             glob.glob(os.path.join(REPO, "*.py")) +
             glob.glob(os.path.join(REPO, "core", "**", "*.py"), recursive=True) +
             glob.glob(os.path.join(REPO, "training", "*.py")) +
             glob.glob(os.path.join(REPO, "benchmarks", "*.py"))]
    return {p[:-3].replace(os.sep, ".").removesuffix(".__init__"): p for p in paths}


def _imports(path, modules):
    """The repository's modules that `path` imports (at any depth of its code)."""
    found = set()
    for node in ast.walk(ast.parse(_read(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in modules}
    return found


def test_the_root_holds_the_originals_files_and_the_package_megatron_cores_paths():
    assert {os.path.basename(p) for p in glob.glob(os.path.join(REPO, "*.py"))} == ROOT
    for path in MEGATRON_PATHS:
        assert os.path.isfile(os.path.join(REPO, path)), path


def test_no_import_circles_and_the_package_imports_no_script_and_no_training():
    modules = _modules()
    graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
    for module, imported in graph.items():
        if module.startswith("core"):
            outside = {i for i in imported if not i.startswith("core")}
            assert not outside, f"{module} imports {sorted(outside)}"
    state = {}  # depth-first search: 1 on the path, 2 done

    def visit(module, path):
        state[module] = 1
        for nxt in sorted(graph[module]):
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[module] = 2
    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def _readme_rows():
    table = re.findall(r"^\| (\d+) \| ([^|]+) \| ([^|]+) \| ([^|]+) \|$", _read("README.md"), re.M)
    return [(concept.strip(), where, paper) for _, concept, where, paper in table]


def _defined(path):
    """Every class and function name in `path`, methods as Class.method too."""
    names = set()
    for node in ast.walk(ast.parse(_read(path))):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                names |= {f"{node.name}.{n.name}" for n in node.body
                          if isinstance(n, ast.FunctionDef)}
    return names


def test_readme_has_a_row_per_concept_naming_functions_that_exist():
    rows = _readme_rows()
    assert len(rows) == CONCEPTS, [r[0] for r in rows]
    for concept, where, paper in rows:
        files = re.findall(r"\]\(([\w/]+\.py)\)", where)
        assert files, f"{concept}: no file linked"
        defined = set().union(*(_defined(f) for f in files))
        named = [n for n in re.findall(r"`([\w.]+)`", where) if not n.endswith(".py")]
        assert named and all(n in defined for n in named), (concept, named)
        assert re.search(r"(Sec|Fig|App|Table)\. ", paper), f"{concept}: no section or figure"


def _reading_path():
    """The files README's table sends a reader to, and the three of the toy model."""
    files = {"model.py", "train.py", "parallel_train.py"}
    for _, where, _ in _readme_rows():
        files |= set(re.findall(r"\]\(([\w/]+\.py)\)", where))
    return sorted(files)


def test_every_function_on_the_reading_path_fits_a_screen():
    """At most 40 lines and 6 parameters. Constructors of layers and models are left out of the
    count of parameters: they take their options as keyword arguments with defaults, as
    Megatron's and torch's layers do."""
    too_long = []
    for path in _reading_path():
        for node in ast.walk(ast.parse(_read(path))):
            if not isinstance(node, ast.FunctionDef):
                continue
            lines = node.end_lineno - node.lineno + 1
            a = node.args
            params = [x for x in a.posonlyargs + a.args + a.kwonlyargs
                      if x.arg not in ("self", "ctx")]
            if lines > 40 or (len(params) > 6 and node.name != "__init__"):
                too_long.append(f"{path}:{node.name} ({lines} lines, {len(params)} parameters)")
    assert not too_long, too_long


def test_f_and_g_reach_the_all_reduce_in_one_hop():
    """f's backward and g's forward call `_reduce`, whose body is torch.distributed's call."""
    tree = ast.parse(_read("core/tensor_parallel/mappings.py"))
    functions = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    calls = lambda node: {ast.unparse(c.func) for c in ast.walk(node) if isinstance(c, ast.Call)}
    for cls, method in (("_CopyToModelParallelRegion", "backward"),
                        ("_ReduceFromModelParallelRegion", "forward")):
        body = next(n for n in classes[cls].body if getattr(n, "name", None) == method)
        assert "_reduce" in calls(body), (cls, method)
    assert "dist.all_reduce" in calls(functions["_reduce"])
    assert functions["_reduce"].end_lineno - functions["_reduce"].lineno < 20


def test_the_group_layout_is_the_one_its_docstring_draws():
    from core.parallel_state import group_ranks
    groups = group_ranks(8, 2, 2)
    assert groups["tensor"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["data"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["pipeline"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups["embedding"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups["stage"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert groups["context"] == [[r] for r in range(8)]  # no context parallelism: no group
    assert groups["data_with_context"] == groups["data"]
    # TP 2 x CP 2 x DP 2 (Megatron's tp-cp-dp-pp): a sequence's context ranks are TP apart, the
    # replicas TP x CP apart, and the gradients are averaged over both together.
    groups = group_ranks(8, 2, 1, 2)
    assert groups["tensor"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["context"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["data"] == [[0, 4], [2, 6], [1, 5], [3, 7]]
    assert groups["data_with_context"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    # Expert parallelism (docs/moe.md draws these): TP 2 x DP 4 with EP 4, and TP 2 x PP 2 with
    # EP 2 (Megatron's tp-ep-dp-pp, the experts whole on each rank), TP 2 x DP 4 with EP 2, ETP 2.
    groups = group_ranks(8, 2, 1, 1, 4)
    assert groups["expert_model"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert groups["expert_data"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    groups = group_ranks(8, 2, 2, 1, 2)
    assert groups["expert_model"] == groups["tensor"]
    assert groups["expert_data"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    groups = group_ranks(8, 2, 1, 1, 2, 2)  # and each expert split over the TP ranks (ETP 2)
    assert groups["expert_tensor"] == groups["tensor"]
    assert groups["expert_model"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["expert_tensor_and_model"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert groups["expert_data"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
