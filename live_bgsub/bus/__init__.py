"""The durable bus: a run's frames shared by workers on many hosts over NATS JetStream.

Three roles, each its own process (or thread), any number of hosts:

- the RunEngine side, :class:`~live_bgsub.bus.publisher.BusPublisher`: documents and
  one frame task per frame onto JetStream, nothing heavier on the RunEngine's thread;
- workers, :class:`~live_bgsub.bus.worker.Worker` (``live-bgsub worker``): tasks from
  one shared durable consumer, results back, acknowledged only once the result is
  stored;
- one composer, :class:`~live_bgsub.bus.composer.Composer` (``live-bgsub compose``):
  results in frame order, one derived run per raw run (HDF5 and Tiled), exactly once
  per frame, restartable.

:mod:`live_bgsub.bus.jetstream` holds the layout (streams, subjects, buckets, the run
plan); :class:`~live_bgsub.bus.server.EmbeddedJetStream` starts a server for tests
and the demo. Imports of this package stay light: nothing here imports nats until a
connection is made.
"""
