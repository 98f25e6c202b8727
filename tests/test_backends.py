"""The Keras backend as an extra: chosen where Keras' own choice would fail, one line where none works."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from live_bgsub.backends import NO_BACKEND, choose_keras_backend

# Makes ``import tensorflow/jax/torch`` fail in a child interpreter, as on a machine
# that has none of them (the specs exist, their import raises ModuleNotFoundError).
BLOCK = textwrap.dedent(
    """
    import importlib.abc, importlib.machinery, sys

    class _Fail(importlib.abc.Loader):
        def create_module(self, spec):
            return None

        def exec_module(self, module):
            raise ModuleNotFoundError(f"No module named {module.__name__!r}", name=module.__name__)

    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name in ("tensorflow", "jax", "torch"):
                return importlib.machinery.ModuleSpec(name, _Fail())

    sys.meta_path.insert(0, _Block())
    """
)


def test_a_backend_is_chosen_only_where_keras_would_fail(tmp_path):
    only = lambda *names: (lambda name: name in names)  # noqa: E731
    env = {}
    assert choose_keras_backend(env, installed=only("torch"), config=None) == "torch"
    assert env == {"KERAS_BACKEND": "torch"}
    assert choose_keras_backend({}, installed=only("jax", "torch"), config=None) == "jax"
    assert choose_keras_backend({}, installed=only("tensorflow", "jax"), config=None) is None  # Keras' default works
    assert choose_keras_backend({"KERAS_BACKEND": "jax"}, installed=only("torch"), config=None) is None
    assert choose_keras_backend({}, installed=only(), config=None) is None  # nothing to choose: the command says so
    # Keras' own configuration file decides where it names a backend.
    (tmp_path / "keras.json").write_text('{"backend": "torch"}')
    env = {"KERAS_HOME": str(tmp_path)}
    assert choose_keras_backend(env, installed=only("jax", "torch")) is None and "KERAS_BACKEND" not in env


def test_no_working_backend_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCK)
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "PYTHONPATH")}
    env.update(PYTHONPATH=str(tmp_path), KERAS_BACKEND="jax")
    proc = subprocess.run(
        [sys.executable, "-m", "live_bgsub.cli", "process", "--sample", "--method", "model:white-top-hat", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0] == f"live-bgsub: error: {NO_BACKEND} (No module named 'jax')"
