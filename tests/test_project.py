"""Project-level promises: a light import, and CI running the README's test command."""

import re
import subprocess
import sys

from conftest import REPO

HEAVY = ("bluesky", "ophyd", "tiled", "keras", "tensorflow", "torch", "jax", "skimage", "cv2", "pyFAI")


def test_science_core_imports_no_heavy_library():
    code = (
        "import sys, live_bgsub, live_bgsub.io, live_bgsub.geometry, live_bgsub.background, "
        "live_bgsub.synth, live_bgsub.metrics, live_bgsub.cli, live_bgsub.inference, live_bgsub.resample, "
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
