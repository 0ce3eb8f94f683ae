"""The node process of the kernel cache: the agent and the CSI plugin sharing one state.

- `settings`: ``gpufleet cache node``'s environment and flags;
- `gpus`: the node's GPUs, read once;
- `state`: per cache and digest the pull's phase, and the published volumes;
- `volumes`: `NodeVolumes`, the `cluster.VolumeSource` the CSI Node service calls;
- `agent`: informers on the caches, pulls with backoff, deletion, GC;
- `pull`: one pull of one digest (labels, compatibility verdicts, the store);
- `threads`: the pull's blocking work in a daemon thread a SIGTERM need not wait for;
- `nodeobject`: the per-node status objects and the Node's labels, written on change only;
- `kubeapi`: the API calls the process makes, and nothing more (its RBAC follows them);
- `metrics`: its Prometheus metrics, read from the state at scrape time;
- `run`: one asyncio process wiring them with the CSI server and the health server.

See docs/kcache-cluster.md, "Node process".
"""
