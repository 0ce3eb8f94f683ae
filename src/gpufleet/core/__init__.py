"""Cross-cutting plumbing: configuration, logging, HTTP endpoints, retry, errors.

The bottom floor: these modules import nothing else of gpufleet.

- `config`: settings from environment variables first, flags on top;
- `logging`: JSON lines (or text) on stderr, never stdout;
- `console`: human tables on stdout, whole when piped;
- `http`: the ``/metrics``, ``/healthz`` and ``/readyz`` server;
- `listen`: unix sockets made ready, and a failed bind said in one line;
- `retry`: backoff with full jitter, and retry loops on it;
- `signals`: SIGTERM and SIGINT stop a command the same way everywhere;
- `lock`: one process at a time on a file;
- `extras`: which optional extra installs a missing module;
- `errors`: the root of every exception hierarchy.
"""
