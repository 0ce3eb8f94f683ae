"""The inventory controller on 5,000 device-plugin pods: wall time, API rate, peak RSS.

The API server is the test double (``tests/doubles/kubeapi``) in this process;
the controller is the real ``gpufleet inventory controller`` in a subprocess,
talking to it over loopback through a kubeconfig, with ``QPS=50``, ``BURST=100``
and ``WORKERS=16``. A rate-limited controller cannot beat QPS, so the figure of
merit is how close it gets: the achieved API rate as a fraction of QPS (target
>= 0.9). The peer is that limit itself. Peak RSS is the controller's own
(``VmHWM``), not the double's.

Usage: python bench/bench_controller.py [PODS]   (default 5000; about 100 s)
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.doubles.kubeapi import KubeApiDouble

QPS, BURST, WORKERS = 50, 100, 16
NS = "gpu-operator"
LABELS = {"app": "nvidia-device-plugin-daemonset"}


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def main(pods: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with KubeApiDouble(bookmark_interval=5.0) as api:
            for n in range(pods):
                api.add_node(f"gpu-{n:05d}", provider_id=f"aws:///us-east-1a/i-{n:017x}")
                api.add_pod(NS, f"nvidia-device-plugin-{n:05d}", node_name=f"gpu-{n:05d}",
                            labels=LABELS)  # fmt: skip
            await api.prerender_smi()
            env = {
                **os.environ, "KUBECONFIG": str(api.write_kubeconfig(Path(tmp) / "kubeconfig")),
                "CLUSTER_NAME": "bench", "EXPORTER_TYPE": "sqlite",
                "SQLITE_PATH": f"{tmp}/inventory.db", "SPOOL_DIR": f"{tmp}/spool",
                "QPS": str(QPS), "BURST": str(BURST), "WORKERS": str(WORKERS),
                "SERVER_PORT": "0", "LOG_LEVEL": "warning", "LEADER_ELECTION": "false",
            }  # fmt: skip
            env.pop("KUBERNETES_SERVICE_HOST", None)
            before = len(api.requests)
            started = time.monotonic()
            log = Path(tmp) / "controller.log"
            with log.open("wb") as stderr:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "gpufleet.cli", "inventory", "controller",
                    env=env, stdout=asyncio.subprocess.DEVNULL, stderr=stderr,
                )  # fmt: skip
            try:
                while api.exec_count() < pods:
                    if proc.returncode is not None:
                        raise SystemExit(f"controller exited: {log.read_text()[-2000:]}")
                    await asyncio.sleep(0.05)
                wall = time.monotonic() - started
                rss = peak_rss_mib(proc.pid)
            finally:
                proc.terminate()
                await asyncio.wait_for(proc.wait(), 60)
            requests = [r for r in api.requests[before:] if r.time <= started + wall]
    rate = len(requests) / wall
    allowed = BURST + QPS * wall  # what the token bucket permits over the run
    print(f"pods                      {pods}")
    print(f"wall time                 {wall:.1f} s")
    print(f"API requests              {len(requests)} ({api.exec_count()} exec)")
    print(f"achieved API rate         {rate:.1f}/s; {len(requests) / allowed:.2f} of the limit "
          f"BURST + QPS x wall = {allowed:.0f} requests (QPS={QPS}, BURST={BURST}; "
          "target >= 0.90)")  # fmt: skip
    print(f"controller peak RSS       {rss:.0f} MiB")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000))
