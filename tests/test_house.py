"""The house rules a newcomer relies on (issue 23): no import cycles between the
engine's modules, counting imports inside functions; no function longer than a screen;
a package `__init__` that holds its public names only; one error type for what a user
acts on, and every other exception shown as the bug it is."""
import ast
from pathlib import Path

import pytest

from conftest import REPO

ENGINE = REPO / "engine"
LONGEST_FUNCTION = 80  # lines


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ENGINE.rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """The engine modules a file imports, anywhere in it (functions included; not the
    `if TYPE_CHECKING:` blocks, which never run), resolved to the modules themselves
    (`from engine.fit import train` names engine.fit)."""
    found = set()
    tree = ast.parse(path.read_text())
    for block in ast.walk(tree):
        if isinstance(block, ast.If) and getattr(block.test, "id", "") == "TYPE_CHECKING":
            block.body = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("engine"):
                found.add(name)
    return found


def test_no_import_cycles_in_the_engine():
    known = modules()
    graph = {m: imports(p, set(known)) - {m} for m, p in known.items()}
    # a package imports its own submodules (its public names): not a cycle
    for m in graph:
        graph[m] = {d for d in graph[m] if not (d.startswith(m + ".")) and
                    not m.startswith(d + ".")}
    cycles = []
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_no_function_in_the_engine_is_longer_than_a_screen():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > LONGEST_FUNCTION:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert not long, "\n".join(long)


def test_the_package_init_holds_its_public_names_only():
    assert len((ENGINE / "__init__.py").read_text().splitlines()) < 40


def test_a_users_error_is_one_line_and_a_bug_its_traceback(tmp_path, monkeypatch, capsys):
    from engine import cli, results
    from engine.errors import UnknownName

    def bug(directory):
        raise KeyError("a bug, not the user's")

    monkeypatch.setattr(results, "load_results", bug)
    with pytest.raises(KeyError, match="a bug"):  # not swallowed into one line
        cli.main(["table", str(tmp_path)])

    def told(directory):
        raise UnknownName("no metric 'x' in the table (it has: test_loss)")

    monkeypatch.setattr(results, "load_results", told)
    assert cli.main(["table", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "no metric 'x' in the table (it has: test_loss)\n"


def test_every_language_model_parameter_says_what_reads_it():
    """What a fit reads decides which chains share generation 1's model: every
    parameter of the LM family declares it where it is declared (engine/families/base.py:
    ROLES), and the fit's are exactly those that change the model generation 1 trains."""
    import dataclasses

    from engine.families import FAMILIES, get_family
    from engine.families.base import ROLES, role

    lm = get_family("lm")
    undeclared = [f.name for f in dataclasses.fields(lm.Config) if "role" not in f.metadata]
    assert not undeclared, f"LanguageModel.Config fields without a role: {undeclared}"
    for name in FAMILIES:
        assert all(role(f) in ROLES for f in dataclasses.fields(get_family(name).Config))
    read_by_fit = set(lm.from_params({}).fit_params())
    assert {"data", "stories", "vocab_size", "model", "context", "epochs", "batch_size", "lr",
            "precision", "trainer", "workers", "gpus_per_worker"} <= read_by_fit
    assert not read_by_fit & {"temperature", "top_k", "top_p", "beams", "prompt", "curate",
                              "sampler", "sampler_actors", "threads", "start",
                              "max_new_tokens", "score_under_first"}
    # generation 1 of the array families starts from scratch whichever `start`
    assert "start" not in get_family("vae").from_params({}).fit_params()


def test_what_a_chain_holds_follows_from_its_placement():
    """A family states the processes a chain starts once (placement()); what the chain
    holds, and whether it gets a Tune callback for its fits, follow from it: no family
    keeps a second account that could disagree."""
    from engine.families import FAMILIES, get_family
    from engine.families.base import Family

    for name in FAMILIES:
        cls = get_family(name)
        assert all(getattr(cls, m) is getattr(Family, m) for m in ("chain_cpus", "chain_gpus"))
    lm = get_family("lm")
    on_ray = lm.from_params({"trainer": "ray", "workers": 4, "cpus_per_worker": 0.5,
                             "gpus_per_worker": 1.0, "sampler_actors": 2, "sampler_cpus": 3,
                             "sampler_gpus": 0.5, "min_workers": 2})
    # fitting holds 4 workers' 2 CPUs and 4 GPUs; sampling 2 actors' 6 CPUs and 1 GPU
    assert on_ray.chain_cpus() == 6.0 and on_ray.chain_gpus() == 4.0
    here = lm.from_params({"trainer": "local", "sampler_actors": 0})
    assert here.placement() == [] and here.chain_cpus() == 0.0  # no Ray processes
    vae = get_family("vae").from_params({"trainer": "ray", "workers": 2,
                                         "cpus_per_worker": 1.5})
    assert vae.chain_cpus() == 3.0
