"""Which run a document belongs to (live_bgsub.routing.RunIndex), for every document kind.

Documents come from event_model's ``compose_run``: two runs interleaved, each with a
descriptor, events and an event page, a Resource with datums and a datum page, and a
StreamResource with a StreamDatum.
"""

from __future__ import annotations

import pytest
from event_model import RunRouter, compose_run, pack_datum_page, pack_event_page

from live_bgsub.routing import RunIndex, named_run

KINDS = ("start", "descriptor", "event", "event_page", "resource", "datum", "datum_page", "stream_resource", "stream_datum", "stop")


def _run():
    """One run's documents, ``{kind: doc}``, every kind once."""
    bundle = compose_run()
    desc = bundle.compose_descriptor(
        name="primary",
        data_keys={
            "x": {"source": "s", "dtype": "number", "shape": []},
            "img": {"source": "s", "dtype": "array", "shape": [4, 4], "external": "STREAM:"},
        },
    )
    events = [desc.compose_event(data={"x": i}, timestamps={"x": 0.0}) for i in range(3)]
    resource = bundle.compose_resource(spec="AD_HDF5", root="/", resource_path="a.h5", resource_kwargs={})
    datums = [resource.compose_datum(datum_kwargs={"point_number": i}) for i in range(3)]
    sres = bundle.compose_stream_resource(mimetype="application/x-hdf5", uri="file://localhost/b.h5", data_key="img", parameters={})
    sdatum = sres.compose_stream_datum(indices={"start": 0, "stop": 2}, seq_nums={"start": 1, "stop": 3}, descriptor=desc.descriptor_doc)
    return {
        "start": bundle.start_doc,
        "descriptor": desc.descriptor_doc,
        "event": events[0],
        "event_page": pack_event_page(*events[1:]),
        "resource": resource.resource_doc,
        "datum": datums[0],
        "datum_page": pack_datum_page(*datums[1:]),
        "stream_resource": sres.stream_resource_doc,
        "stream_datum": sdatum,
        "stop": bundle.compose_stop(),
    }


def _feed(index, *runs):
    """Add the runs' documents interleaved, kind by kind; return what add answered."""
    return {(kind, i): index.add(kind, run[kind]) for kind in KINDS for i, run in enumerate(runs)}


def test_every_document_kind_goes_to_its_run():
    a, b = _run(), _run()
    index = RunIndex()
    answers = _feed(index, a, b)
    for kind in KINDS:
        assert answers[kind, 0] == a["start"]["uid"], kind
        assert answers[kind, 1] == b["start"]["uid"], kind
        assert index.run_of(kind, a[kind]) == a["start"]["uid"], kind
    assert index.runs == [a["start"]["uid"], b["start"]["uid"]]
    assert a["start"]["uid"] in index and len(index) == 2
    assert index.resource(a["resource"]["uid"]) is a["resource"]
    assert index.resource(b["stream_resource"]["uid"]) is b["stream_resource"]
    assert not any(index.unattributed(kind, a[kind]) for kind in KINDS)


def test_a_stream_datum_goes_by_its_descriptor_else_by_its_stream_resource():
    a, b = _run(), _run()
    index = RunIndex()
    _feed(index, a, b)
    unknown_descriptor = dict(a["stream_datum"], descriptor="not-seen")
    assert index.run_of("stream_datum", unknown_descriptor) == a["start"]["uid"]
    # The descriptor wins: it says which stream, and so which run, the frames are of.
    crossed = dict(a["stream_datum"], stream_resource=b["stream_resource"]["uid"])
    assert index.run_of("stream_datum", crossed) == a["start"]["uid"]
    assert index.run_of("stream_datum", dict(a["stream_datum"], descriptor="?", stream_resource="?")) is None


def test_documents_of_an_unknown_run_or_uid():
    a = _run()
    index = RunIndex()
    # Nothing referred to is known: no run.
    for kind in ("event", "event_page", "datum", "datum_page", "stream_datum"):
        assert index.add(kind, a[kind]) is None, kind
    assert index.add("bulk_events", {}) is None and index.run_of("anything", {"run_start": "x"}) is None
    # A stop names its run even when nothing of it was seen, and records nothing.
    assert index.add("stop", a["stop"]) == a["start"]["uid"]
    assert index.runs == []
    # A run whose start never came (a restarted server): its descriptor makes it known,
    # and its events follow.
    assert index.add("descriptor", a["descriptor"]) == a["start"]["uid"]
    assert index.runs == [a["start"]["uid"]]
    assert index.add("event", a["event"]) == index.add("event_page", a["event_page"]) == a["start"]["uid"]


def test_run_of_records_nothing():
    a = _run()
    index = RunIndex()
    for kind in KINDS:
        index.run_of(kind, a[kind])
    assert index.runs == [] and index.resource(a["resource"]["uid"]) is None
    assert index.run_of("event", a["event"]) is None


def test_resources_without_run_start_belong_to_no_run():
    a = _run()
    index = RunIndex()
    _feed(index, a)
    resource = {k: v for k, v in a["resource"].items() if k != "run_start"} | {"uid": "res-no-run"}
    sres = {k: v for k, v in a["stream_resource"].items() if k != "run_start"} | {"uid": "sres-no-run"}
    datum = dict(a["datum"], resource="res-no-run", datum_id="res-no-run/0")
    page = dict(a["datum_page"], resource="res-no-run")
    sdatum = dict(a["stream_datum"], stream_resource="sres-no-run")
    assert index.add("resource", resource) is None and index.add("stream_resource", sres) is None
    assert index.add("datum", datum) is None and index.add("datum_page", page) is None
    for kind, doc in (("resource", resource), ("stream_resource", sres), ("datum", datum), ("datum_page", page), ("stream_datum", sdatum)):
        assert index.unattributed(kind, doc), kind
    assert index.resource("res-no-run") is resource and index.resource("sres-no-run") is sres
    # Its stream datum still names the run's descriptor.
    assert index.add("stream_datum", sdatum) == a["start"]["uid"]
    assert index.runs == [a["start"]["uid"]]


def test_forget_at_the_stop():
    a, b = _run(), _run()
    index = RunIndex()
    _feed(index, a, b)
    index.forget(a["start"]["uid"])
    for kind in ("event", "event_page", "datum", "datum_page", "stream_datum"):
        assert index.run_of(kind, a[kind]) is None, kind
        assert index.run_of(kind, b[kind]) == b["start"]["uid"], kind
    assert index.resource(a["resource"]["uid"]) is None and index.resource(a["stream_resource"]["uid"]) is None
    assert index.run_of("stop", a["stop"]) == a["start"]["uid"]  # a stop still names its run
    assert index.runs == [b["start"]["uid"]]
    index.forget(a["start"]["uid"])  # again, and an unknown run: nothing happens
    index.forget("never-seen")
    assert index.runs == [b["start"]["uid"]]


def test_only_the_last_runs_are_kept():
    runs = [_run() for _ in range(5)]
    index = RunIndex(keep=3)
    for run in runs:  # one run after the other, none stopped
        _feed(index, run)
    assert index.runs == [r["start"]["uid"] for r in runs[2:]]
    for run in runs[:2]:
        assert index.run_of("event", run["event"]) is None and index.resource(run["resource"]["uid"]) is None
    for run in runs[2:]:
        assert index.run_of("datum_page", run["datum_page"]) == run["start"]["uid"]
    # A run known from its descriptor counts like one known from its start.
    late = _run()
    index.add("descriptor", late["descriptor"])
    assert index.runs == [r["start"]["uid"] for r in runs[3:]] + [late["start"]["uid"]]
    # keep=None: every run until forgotten.
    everything = RunIndex(keep=None)
    _feed(everything, *runs)
    assert len(everything) == 5


def test_only_the_last_resources_without_run_start_are_kept():
    index = RunIndex(keep_unattributed=2)
    for i in range(3):
        index.add("resource", {"uid": f"r{i}", "spec": "AD_HDF5", "resource_path": "a.h5", "root": "/", "resource_kwargs": {}})
    assert index.resource("r0") is None and index.resource("r1") is not None and index.resource("r2") is not None
    assert not index.unattributed("datum", {"resource": "r0", "datum_id": "r0/0", "datum_kwargs": {}})


@pytest.mark.parametrize("kwargs, match", [
    ({"keep": 0}, "keep must be a positive integer or None, got 0"),
    ({"keep": True}, "keep must be a positive integer or None, got True"),
    ({"keep": 2.5}, "got 2.5"),
    ({"keep_unattributed": None}, "keep_unattributed must be a positive integer, got None"),
])
def test_bad_bounds_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RunIndex(**kwargs)


def test_named_run():
    a = _run()
    assert named_run("start", a["start"]) == a["start"]["uid"]
    for kind in ("stop", "descriptor", "resource", "stream_resource"):
        assert named_run(kind, a[kind]) == a["start"]["uid"], kind
    for kind in ("event", "event_page", "datum", "datum_page", "stream_datum"):
        assert named_run(kind, a[kind]) is None, kind
    assert named_run("stop", None) is None and named_run("resource", {"uid": "r"}) is None


def test_event_model_run_router_still_raises_where_run_index_answers():
    """Why the package does not route with RunRouter (routing's module docstring): if
    event-model changes this, reconsider."""
    a, b = _run(), _run()
    router = RunRouter([lambda name, start: ([lambda name, doc: None], [])])
    router("start", a["start"])
    with pytest.raises(KeyError):
        router("descriptor", b["descriptor"])  # a run whose start it did not see
    router("descriptor", a["descriptor"])
    with pytest.raises(KeyError):
        router("stream_datum", dict(a["stream_datum"], stream_resource="not-seen"))
    index = RunIndex()
    assert index.add("descriptor", b["descriptor"]) == b["start"]["uid"]
    assert index.add("stream_datum", dict(b["stream_datum"], stream_resource="not-seen")) == b["start"]["uid"]
