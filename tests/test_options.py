"""The processing options: one type and one declaration for every entry point."""

from __future__ import annotations

import pytest

from live_bgsub.background import WORKING_DOWNSAMPLE
from live_bgsub.beamline import BeamlineConfig
from live_bgsub.bus.cli import compose_main
from live_bgsub.bus.jetstream import job_key
from live_bgsub.cli import main
from live_bgsub.engine import make_step
from live_bgsub.inference import ModelError
from live_bgsub.options import ProcessingOptions, processing_arguments
from live_bgsub.serve import main as serve_main


def test_parse_types_the_parameters_and_refuses_what_does_not_fit():
    options = ProcessingOptions.parse("white-top-hat", ["tophat=12"], downsample=2)
    assert options.params == {"tophat": 12.0} and options.downsample == 2 and not options.is_model
    assert options.callback_kwargs() == {"method": "white-top-hat", "params": {"tophat": 12.0}, "downsample": 2}
    assert ProcessingOptions("model:white-top-hat").is_model
    with pytest.raises(ValueError, match="unknown parameter 'radius' for background method 'white-top-hat'"):
        ProcessingOptions.parse("white-top-hat", ["radius=3"])
    with pytest.raises(ValueError, match="a model takes no parameters"):
        ProcessingOptions.parse("model:white-top-hat", ["tophat=3"])
    with pytest.raises(ValueError, match="downsample must be an integer >= 1, got 0"):
        ProcessingOptions("white-top-hat", {}, 0)


def test_the_beamline_config_is_made_of_the_same_options():
    cfg = BeamlineConfig(method="white-top-hat", params={"tophat": 7.0}, downsample=2)
    assert cfg.processing == ProcessingOptions("white-top-hat", {"tophat": 7.0}, 2)
    with pytest.raises(ValueError, match="a model takes no parameters"):
        BeamlineConfig(method="model:white-top-hat", params={"tophat": 7.0})
    with pytest.raises(ValueError, match="downsample must be an integer >= 1, got 0"):
        BeamlineConfig(downsample=0)


def test_the_parent_parser_gives_the_options():
    import argparse

    parser = argparse.ArgumentParser(parents=[processing_arguments()])
    args = parser.parse_args(["--method", "white-top-hat", "--param", "tophat=9", "--downsample", "2"])
    assert ProcessingOptions.from_args(args) == ProcessingOptions("white-top-hat", {"tophat": 9.0}, 2)
    assert ProcessingOptions.from_args(parser.parse_args([])) == ProcessingOptions()


@pytest.mark.parametrize(
    "entry, argv",
    [
        (main, ["replay", "--tiled", "http://127.0.0.1:9/api/v1"]),
        (serve_main, ["--zmq", "127.0.0.1:9"]),
        (compose_main, ["--tiled", "http://127.0.0.1:9/api/v1"]),
    ],
    ids=["replay", "serve", "compose"],
)
def test_every_entry_point_declares_the_options_once(entry, argv, capsys):
    """replay, serve and compose share the declaration: the same one-line refusal."""
    with pytest.raises(SystemExit) as stopped:
        entry([*argv, "--downsample", "0"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("--downsample: expected an integer >= 1, got 0"), err


@pytest.mark.parametrize(
    "entry, argv",
    [(main, ["replay"]), (main, ["recover"]), (serve_main, []), (compose_main, [])],
    ids=["replay", "recover", "serve", "compose"],
)
def test_every_tiled_command_declares_where_the_runs_are_once(entry, argv, capsys):
    with pytest.raises(SystemExit) as stopped:
        entry([*argv, "--help"])
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    tiled = out[out.index("\nTiled:\n"):]
    for option in ("--tiled URI", "--api-key API_KEY", "--catalog CATALOG"):
        assert option in tiled, (option, out)


def test_a_classical_method_works_at_musclex_resolution_unless_told_otherwise():
    """The working resolution every entry point uses when none is named: 2 for a
    classical method (MuscleX's, and the shipped models' card), one spelling of it."""
    assert WORKING_DOWNSAMPLE == 2
    assert ProcessingOptions().downsample == ProcessingOptions.parse("white-top-hat", [], 2).downsample == 2
    assert ProcessingOptions("white-top-hat", {}, 1).downsample == 1
    assert ProcessingOptions("model:white-top-hat").downsample is None  # the card's
    assert BeamlineConfig().processing.callback_kwargs()["downsample"] == 2
    assert make_step("smoothed-gaussian").describe()["downsample"] == 2
    assert make_step("smoothed-gaussian", downsample=1).describe()["downsample"] == 1


def test_a_model_runs_at_its_own_working_resolution_only():
    pytest.importorskip("keras")
    step = make_step("model:white-top-hat")
    card = step.model.downsample
    assert step.describe()["downsample"] == card == WORKING_DOWNSAMPLE  # like its method at the defaults
    assert make_step("model:white-top-hat", downsample=card).describe()["downsample"] == card
    with pytest.raises(ModelError, match=rf"^downsample 1 given, but model:white-top-hat works at downsample {card} \(its card\)"):
        make_step("model:white-top-hat", downsample=1)
    # Its own resolution named or not is one processing (one bus job, one derived run);
    # another stays as asked, for step() to refuse in one line.
    named = ProcessingOptions.parse("model:white-top-hat", [], card)
    assert named == ProcessingOptions("model:white-top-hat") and named.downsample is None
    assert job_key("u", named.callback_kwargs()) == job_key("u", ProcessingOptions("model:white-top-hat").callback_kwargs())
    assert ProcessingOptions("model:white-top-hat", {}, 1).downsample == 1
    assert ProcessingOptions("model:/nowhere/else.keras", {}, 2).downsample == 2  # another host's path: as given
