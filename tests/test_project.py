"""Project-level promises: a light import, CI running the README's test command, and no
module of the package using another's private names."""

import ast
import re
import subprocess
import sys

from conftest import REPO

HEAVY = ("bluesky", "ophyd", "tiled", "keras", "tensorflow", "torch", "jax", "skimage", "cv2", "pyFAI")


def test_science_core_imports_no_heavy_library():
    code = (
        "import sys, live_bgsub, live_bgsub.io, live_bgsub.geometry, live_bgsub.fold, live_bgsub.background, "
        "live_bgsub.synth, live_bgsub.metrics, live_bgsub.reflections, live_bgsub.cli, live_bgsub.inference, live_bgsub.resample, "
        "live_bgsub.provenance, live_bgsub.engine, live_bgsub.sim, live_bgsub.sinks, live_bgsub.tiled_server, "
        "live_bgsub.beamline, live_bgsub.demo, live_bgsub.replay, live_bgsub.catalog\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_cmd = next(b for b in blocks if "pytest" in b)
    assert test_cmd in (REPO / ".ci" / "run").read_text()


# Private names still imported across modules; make them public (or move them) and drop
# the entry. The test fails on a new one, and on an entry that no longer occurs.
KNOWN_PRIVATE_USES: set = set()


def _module_name(path):
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _private_uses(path, modules):
    """``{"file: module._name"}`` for each private name of another package module used in ``path``.

    Catches ``from .x import _y`` (relative or absolute) and ``x._y`` where ``x`` names a
    package module (``from . import x [as m]``, ``import live_bgsub.x [as m]``).
    """
    current = _module_name(path)
    package = current if path.name == "__init__.py" else current.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases, uses = {}, set()

    def private(name):
        return name.startswith("_") and not name.startswith("__")

    def use(module, name):
        if module != current:
            uses.add(f"{path.relative_to(REPO).as_posix()}: {module}.{name}")

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "live_bgsub":
                continue
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
                elif private(alias.name):
                    use(source, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "live_bgsub":  # binds the module itself, or the package
                    aliases[alias.asname or "live_bgsub"] = alias.name if alias.asname else "live_bgsub"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.insert(0, value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in aliases:
                module = ".".join([aliases[value.id]] + chain)
                if module in modules:
                    use(module, node.attr)
    return uses


def test_no_module_uses_another_modules_private_names():
    package = sorted((REPO / "live_bgsub").rglob("*.py"))
    modules = {_module_name(p) for p in package}
    # The package, and what is built on it: training, the benchmarks and the tests.
    users = [p for d in ("training", "benchmarks", "tests") for p in sorted((REPO / d).rglob("*.py"))]
    found = set().union(*(_private_uses(p, modules) for p in package + users))
    assert found - KNOWN_PRIVATE_USES == set(), "private names used across modules (make them public)"
    assert KNOWN_PRIVATE_USES - found == set(), "fixed: remove these from KNOWN_PRIVATE_USES"
