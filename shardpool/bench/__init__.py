"""``shardpool bench``: the load test with an order check, and the baselines it compares with.

One module per role:

* :mod:`~shardpool.bench.options` — :class:`~shardpool.bench.options.BenchOptions`, one scenario's
  options; the command-line flags are made from its fields.
* :mod:`~shardpool.bench.scenario` — :func:`~shardpool.bench.scenario.run_bench`, the scenario in
  phases: traffic, interleaved throughput runs, latency, the by-type comparison.
* :mod:`~shardpool.bench.runs` — :func:`~shardpool.bench.runs.run_pool`, one pool run.
* :mod:`~shardpool.bench.handlers` — the handlers those pools run (named by ``module:attr``).
* :mod:`~shardpool.bench.report` — progress lines, the JSON report and its text.
* :mod:`~shardpool.bench.baselines` — the one-pass pyzmq+cbor2 ceiling, the per-item harness,
  the mp.Queue pool and the bare ping-pong (their processes in
  :mod:`~shardpool.bench.baseline_workers`, a synthetic stream in :mod:`~shardpool.bench.stream`).
* :mod:`~shardpool.bench.ceilings` — the ceilings section: each figure of shardpool as a ratio to
  its baseline measured in the same run, with its target; it uses
  :mod:`~shardpool.bench.ingress_run` (ingress vs in-process submits) and
  :mod:`~shardpool.bench.recovery_run` (recovery after SIGKILL), which the scripts
  ``ingress_throughput.py`` and ``recovery.py`` print on their own.
* :mod:`~shardpool.bench.remote` — ``--connect``: the load test through a running backend's
  ingress.

Nothing is imported here: worker processes import :mod:`~shardpool.bench.handlers` by name, and
the command line imports :mod:`~shardpool.bench.options` to build its flags; neither needs the rest.
"""
