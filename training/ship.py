"""Install a trained run as a shipped model: ``python -m training.ship RUN_DIR NAME``.

Copies ``RUN_DIR/model.keras``, ``model.json`` (the card, its ``name`` set to NAME) and
``history.json`` to ``live_bgsub/weights/NAME.keras``, ``NAME.json`` and
``NAME.history.json``, after checking that the model loads with ``safe_mode=True`` and
that NAME is one of the shipped names. A RUN_DIR that is not a finished run, or whose
model does not load, is one line, ``python -m training.ship: error: WHAT``, and exit
status 2 (:mod:`live_bgsub.errors`).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from live_bgsub.errors import ArgumentParser, usage_exit
from live_bgsub.inference import SHIPPED_MODELS, BackgroundModel
from live_bgsub.logs import quiet_libraries, verbose_requested

PROG = "python -m training.ship"

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "live_bgsub" / "weights"


def ship(run_dir, name: str, weights_dir: Path = WEIGHTS_DIR) -> Path:
    run_dir = Path(run_dir)
    if name not in SHIPPED_MODELS:
        raise ValueError(f"{name!r} is not a shipped model name; expected one of {', '.join(SHIPPED_MODELS)}")
    for needed in ("model.keras", "model.json", "history.json"):
        if not (run_dir / needed).exists():
            raise FileNotFoundError(f"{run_dir / needed} is missing: is {run_dir} a finished training.fit run?")
    BackgroundModel.load(run_dir / "model.keras")  # loads with safe_mode, or raises
    weights_dir.mkdir(parents=True, exist_ok=True)
    target = weights_dir / f"{name}.keras"
    shutil.copyfile(run_dir / "model.keras", target)
    card = json.loads((run_dir / "model.json").read_text())
    card["name"] = name
    target.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    shutil.copyfile(run_dir / "history.json", weights_dir / f"{name}.history.json")
    return target


def main(argv=None) -> int:
    verbose, argv = verbose_requested(sys.argv[1:] if argv is None else argv)
    quiet_libraries(verbose)  # -v: TensorFlow's start-up lines too
    ap = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", help="the --out directory of a finished training.fit run")
    ap.add_argument("name", choices=SHIPPED_MODELS)
    args = ap.parse_args(argv)
    try:
        target = ship(args.run_dir, args.name)
    except (FileNotFoundError, ValueError) as exc:  # ValueError: ModelError, the model does not load
        usage_exit(PROG, exc)
    print(target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
