"""The import directions of docs/design.md, read from the source (every import, including those inside functions):
nothing imports upward and there are no circles."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("mvtec_caption", "axf_pipeline")
ON_TOP = ("demo", "app", "integrations")  # stand on top: nothing in the core imports them
FRONT_ENDS = ("axf_pipeline.cli", "axf_pipeline.__main__", "axf_pipeline.generate", "axf_pipeline.synthesize")
PIPELINE = (
    "axf_pipeline",
    "axf_pipeline.pipeline_anomaly_x_fusion",
    "axf_pipeline.models",
    "axf_pipeline.conditioning",
    "axf_pipeline.image_processing",
    "axf_pipeline.remote_code",
    "axf_pipeline.publishing",
    "axf_pipeline.model_index",
)


def modules(root=ROOT) -> dict[str, tuple[pathlib.Path, bool]]:
    """Dotted name -> (file, is a package) for every module of our two packages."""
    found = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def imports_of(name: str, known: dict) -> set[str]:
    """The modules of ``known`` that ``name`` imports anywhere in its source (relative imports resolved)."""
    path, is_package = known[name]
    here = name.split(".") if is_package else name.split(".")[:-1]
    wanted = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            wanted.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[: len(here) - node.level + 1] + [node.module or ""]).strip(".")
            module = base if node.level else node.module
            submodules = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in known]
            wanted.update(submodules)
            if len(submodules) < len(node.names):  # names from the module itself
                wanted.add(module)
    resolved = set()
    for module in wanted:
        while module and module not in known:
            module = module.rpartition(".")[0]
        if module and module != name:
            resolved.add(module)
    return resolved


def graph(root=ROOT) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports_of(name, known) for name in known}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def within(name: str, *areas: str) -> bool:
    return any(name == a or name.startswith(a + ".") for a in areas)


def is_front_end(name: str) -> bool:
    """Command-line modules dispatch to whatever their subcommand drives (``axf evaluate --detector
    anomalib-draem``, ``axf demo``, ``axf app``)."""
    return name in FRONT_ENDS or name.endswith(".cli") or name.endswith(".__main__")


RULES = [
    ("mvtec_caption imports nothing of axf_pipeline", ("mvtec_caption",), ("axf_pipeline",)),
    (
        "the pipeline never imports training, synthesis or evaluation",
        PIPELINE,
        tuple(f"axf_pipeline.{a}" for a in ("training", "synthesis", "evaluation", *ON_TOP)),
    ),
    (
        "training never imports synthesis or evaluation",
        ("axf_pipeline.training",),
        tuple(f"axf_pipeline.{a}" for a in ("synthesis", "evaluation", *ON_TOP)),
    ),
    (
        "evaluation never imports synthesis",
        ("axf_pipeline.evaluation",),
        tuple(f"axf_pipeline.{a}" for a in ("synthesis", "training", *ON_TOP)),
    ),
    (
        "synthesis stands on the pipeline: it imports neither training nor evaluation",
        ("axf_pipeline.synthesis",),
        tuple(f"axf_pipeline.{a}" for a in ("training", "evaluation", *ON_TOP)),
    ),
]


def violations(edges, importers, forbidden) -> list[str]:
    def is_importer(m):
        # the package itself counts only as an exact name; its subpackages are judged by their own rules
        return m in importers or any(m.startswith(a + ".") and a != "axf_pipeline" for a in importers)

    return sorted(
        f"{a} -> {b}"
        for a, targets in edges.items()
        if is_importer(a) and not is_front_end(a)
        for b in targets
        if within(b, *forbidden)
    )


@pytest.fixture(scope="module")
def edges():
    return graph()


def test_there_are_no_import_circles(edges):
    assert len(edges) > 50  # the walk found the packages
    assert circles(edges) == []


@pytest.mark.parametrize("rule, importers, forbidden", RULES, ids=[r[0] for r in RULES])
def test_imports_point_down(edges, rule, importers, forbidden):
    assert violations(edges, importers, forbidden) == [], rule


def test_nothing_in_the_core_imports_demo_app_or_integrations(edges):
    on_top = tuple(f"axf_pipeline.{a}" for a in ON_TOP)
    found = sorted(
        f"{a} -> {b}"
        for a, targets in edges.items()
        if not within(a, *on_top) and not is_front_end(a)
        for b in targets
        if within(b, *on_top)
    )
    assert found == []


def test_the_checks_see_an_upward_import_and_a_circle(tmp_path):
    """The walk itself: a lazy import inside a function counts, and a circle through it is found."""
    (tmp_path / "mvtec_caption").mkdir()
    (tmp_path / "mvtec_caption" / "__init__.py").write_text("")
    (tmp_path / "mvtec_caption" / "x.py").write_text("def f():\n    from axf_pipeline.training import loop\n")
    pkg = tmp_path / "axf_pipeline" / "training"
    pkg.mkdir(parents=True)
    (tmp_path / "axf_pipeline" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from .loop import train\n")
    (pkg / "loop.py").write_text("from . import export\ntrain = 1\n")
    (pkg / "export.py").write_text("def g():\n    from .loop import train\n")
    edges = graph(tmp_path)
    assert edges["mvtec_caption.x"] == {"axf_pipeline.training.loop"}
    assert violations(edges, ("mvtec_caption",), ("axf_pipeline",)) == [
        "mvtec_caption.x -> axf_pipeline.training.loop"
    ]
    assert circles(edges) == [["axf_pipeline.training.export", "axf_pipeline.training.loop"]]
