"""/proc/<pid>/cgroup → pod UID and container id, one row per real-world file shape.

The shapes come from the kubelet's cgroup naming (cgroupfs and systemd drivers),
the runtimes' leaf names (containerd, CRI-O, Docker), k3s/rke2/k3d/kind nodes
and cgroup namespaces, each written out the way the kernel prints the file.
"""

from __future__ import annotations

import random
import re

import pytest

from gpufleet.exporter.podmap.cgroup import CgroupRef, parse_cgroup

UID = "cd613e30-d8f1-4adf-91b7-584a2265b1f5"
UID_ = UID.replace("-", "_")  # how the systemd driver writes it in a slice name
OTHER_UID = "1e2feb89-414c-443c-9027-c4d1c386bbc4"
OTHER_UID_ = OTHER_UID.replace("-", "_")
CID = "cd447e35b8b6d8fe442e3d437204e52db2221a58008a05a6c4647159c324c985"
OTHER_CID = "05b6e6e307d4bedc51431193e6c3f3391a2b8f1ff1fd42a29755d4c13a902931"
# A static pod's UID is the kubelet's MD5 of its manifest: 32 hex digits, no dashes.
STATIC_UID = "5c1a9f1e0b7d4e3a9c2f8e6d4b2a1908"
CANONICAL_UID = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}"
)
CONTAINER_ID = re.compile(r"[0-9a-f]{12,128}")
NODE_CID = "afbd67f9619699cfe1988ad9f06c144a025b413f8a9a021ea648a7dd06839eb9"

SYSTEMD_BURSTABLE = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
SYSTEMD_BESTEFFORT = (
    f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"
)
KIND_BESTEFFORT = (
    "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
    f"kubelet-kubepods-besteffort-pod{UID_}.slice"
)


def v1_file(path: str, *, unified: str = "/", systemd: str | None = None) -> str:
    """A cgroup v1 (hybrid) file: every controller at ``path``, then the unified line."""
    return (
        f"12:pids:{path}\n"
        f"11:hugetlb:{path}\n"
        f"10:net_cls,net_prio:{path}\n"
        f"9:memory:{path}\n"
        f"8:cpuset:{path}\n"
        f"7:devices:{path}\n"
        "6:rdma:/\n"
        f"5:perf_event:{path}\n"
        f"4:freezer:{path}\n"
        f"3:blkio:{path}\n"
        f"2:cpu,cpuacct:{path}\n"
        f"1:name=systemd:{systemd if systemd is not None else path}\n"
        f"0::{unified}\n"
    )


def v2_file(path: str) -> str:
    """A pure cgroup v2 file: the single unified line."""
    return f"0::{path}\n"


POD_CASES = [
    # --- static pods: the kubelet's 32-hex UID --------------------------------------
    pytest.param(
        v2_file(
            "/kubepods.slice/kubepods-burstable.slice/"
            f"kubepods-burstable-pod{STATIC_UID}.slice/cri-containerd-{CID}.scope"
        ),
        (STATIC_UID, CID),
        id="v2 systemd driver static pod gives its kubelet uid and the container",
    ),
    pytest.param(
        v1_file(f"/kubepods/burstable/pod{STATIC_UID}/{CID}"),
        (STATIC_UID, CID),
        id="v1 cgroupfs static pod gives its kubelet uid and the container",
    ),
    pytest.param(
        v2_file(f"/kubepods/pod{STATIC_UID.upper()}/{CID}"),
        (STATIC_UID, CID),
        id="static pod uid comes back in lower case",
    ),
    # --- cgroup v1, cgroupfs driver -------------------------------------------------
    pytest.param(
        v1_file(f"/kubepods/burstable/pod{UID}/{CID}"),
        (UID, CID),
        id="v1 cgroupfs burstable pod gives the pod and the container",
    ),
    pytest.param(
        v1_file(f"/kubepods/besteffort/pod{UID}/{CID}"),
        (UID, CID),
        id="v1 cgroupfs besteffort pod gives the pod and the container",
    ),
    pytest.param(
        v1_file(f"/kubepods/pod{UID}/{CID}"),
        (UID, CID),
        id="v1 cgroupfs guaranteed pod has no qos level",
    ),
    pytest.param(
        v1_file(
            f"/kubepods/burstable/pod{UID}/{OTHER_CID}", unified="/system.slice/docker.service"
        ),
        (UID, OTHER_CID),
        id="v1 docker runtime names the container by its 64-hex docker id",
    ),
    # --- cgroup v1, systemd driver ----------------------------------------------------
    pytest.param(
        v1_file(f"{SYSTEMD_BURSTABLE}/cri-containerd-{CID}.scope"),
        (UID, CID),
        id="v1 systemd driver cri-containerd scope gives the container",
    ),
    pytest.param(
        v1_file(f"/kubepods.slice/kubepods-pod{UID_}.slice/docker-{CID}.scope"),
        (UID, CID),
        id="v1 systemd driver guaranteed docker scope gives the container",
    ),
    # --- cgroup v1 lines that disagree --------------------------------------------------
    pytest.param(
        v1_file(
            f"/kubepods/besteffort/pod{UID}/{CID}",
            systemd="/system.slice/containerd.service",
            unified="/system.slice/containerd.service",
        ),
        (UID, CID),
        id="v1 hybrid with a host unified line takes the first line naming a pod",
    ),
    pytest.param(
        v1_file(
            f"/kubepods/besteffort/pod{OTHER_UID}/{OTHER_CID}",
            unified=f"{SYSTEMD_BESTEFFORT}/cri-containerd-{CID}.scope",
        ),
        (UID, CID),
        id="v1 hybrid prefers the unified line when it names a pod",
    ),
    pytest.param(
        "11:name=systemd:/kubepods/besteffort/pod" + UID + "/" + CID + "\n"
        "10:cpuset:/docker/" + NODE_CID + "/kubepods/besteffort/pod" + UID + "/" + CID + "\n"
        "9:memory:/docker/" + NODE_CID + "/kubepods/besteffort/pod" + UID + "/" + CID + "\n"
        "1:cpu,cpuacct:/docker/" + NODE_CID + "/kubepods/besteffort/pod" + UID + "/" + CID + "\n",
        (UID, CID),
        id="v1 pod below a system-docker parent is found under the parent",
    ),
    # --- cgroup v2, systemd driver -------------------------------------------------------
    pytest.param(
        v2_file(f"{SYSTEMD_BURSTABLE}/cri-containerd-{CID}.scope"),
        (UID, CID),
        id="v2 systemd cri-containerd scope gives the container",
    ),
    pytest.param(
        v2_file(f"{SYSTEMD_BESTEFFORT}/crio-{CID}.scope"),
        (UID, CID),
        id="v2 systemd crio scope gives the container",
    ),
    pytest.param(
        v2_file(f"{SYSTEMD_BURSTABLE}/crio-{CID}.scope/container"),
        (UID, CID),
        id="v2 systemd crio nested container leaf gives the container",
    ),
    pytest.param(
        v2_file(f"{SYSTEMD_BURSTABLE}/docker-{CID}.scope"),
        (UID, CID),
        id="v2 systemd docker scope gives the container",
    ),
    pytest.param(
        v2_file(f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope"),
        (UID, CID),
        id="v2 systemd guaranteed pod has no qos slice",
    ),
    pytest.param(
        v2_file(f"{SYSTEMD_BURSTABLE}/crio-conmon-{CID}.scope"),
        (UID, None),
        id="v2 systemd crio conmon monitor gives the pod but no container",
    ),
    pytest.param(
        v2_file(SYSTEMD_BURSTABLE),
        (UID, None),
        id="v2 systemd pod slice itself gives the pod but no container",
    ),
    pytest.param(
        v2_file(f"/kubepods-besteffort-pod{UID_}.slice:cri-containerd:{CID}"),
        (UID, CID),
        id="v2 systemd cgroupsPath taken literally by a cgroupfs runtime gives the container",
    ),
    # --- cgroup v2, cgroupfs driver --------------------------------------------------------
    pytest.param(
        v2_file(f"/kubepods/burstable/pod{UID}/{CID}"),
        (UID, CID),
        id="v2 cgroupfs burstable pod gives the container",
    ),
    pytest.param(
        v2_file(f"/kubepods/pod{UID}/{CID}"),
        (UID, CID),
        id="v2 cgroupfs guaranteed pod has no qos level",
    ),
    pytest.param(
        v2_file(f"/kubepods/besteffort/pod{UID}/crio-{CID}"),
        (UID, CID),
        id="v2 cgroupfs crio leaf drops the crio prefix",
    ),
    pytest.param(
        v2_file(f"/kubepods/besteffort/pod{UID}/crio-conmon-{CID}"),
        (UID, None),
        id="v2 cgroupfs crio conmon monitor gives the pod but no container",
    ),
    # --- k3s, rke2, k3d, k0s ---------------------------------------------------------------
    pytest.param(
        v1_file(f"/kubepods/besteffort/pod{UID}/{CID}", unified="/system.slice/k3s-agent.service"),
        (UID, CID),
        id="k3s v1 cgroupfs default (agent unit on the unified line) gives the container",
    ),
    pytest.param(
        v2_file(f"/kubepods/burstable/pod{UID}/{CID}"),
        (UID, CID),
        id="k3s v2 cgroupfs default gives the container",
    ),
    pytest.param(
        v2_file(f"{SYSTEMD_BESTEFFORT}/cri-containerd-{CID}.scope"),
        (UID, CID),
        id="k3s and rke2 under systemd use the systemd driver and give the container",
    ),
    pytest.param(
        v2_file(f"/system.slice/docker-{NODE_CID}.scope/kubepods/besteffort/pod{UID}/{CID}"),
        (UID, CID),
        id="k3d node container scope above the pod is not taken as the container",
    ),
    pytest.param(
        v2_file(f"/kubelet/kubepods/besteffort/pod{UID}/{CID}"),
        (UID, CID),
        id="kubelet under a custom cgroup root gives the container",
    ),
    # --- kind, CI runners, cgroup namespaces, nesting -----------------------------------------
    pytest.param(
        v2_file(
            f"/system.slice/docker-{NODE_CID}.scope{KIND_BESTEFFORT}/cri-containerd-{CID}.scope"
        ),
        (UID, CID),
        id="kind node seen from the host gives the pod inside the node",
    ),
    pytest.param(
        v2_file(f"{KIND_BESTEFFORT}/cri-containerd-{CID}.scope"),
        (UID, CID),
        id="kind kubelet slice prefix seen from inside the node gives the container",
    ),
    pytest.param(
        v2_file(f"/actions_job/{NODE_CID}/kubepods/besteffort/pod{UID}/{CID}"),
        (UID, CID),
        id="ci runner parent cgroup above kubepods is skipped",
    ),
    pytest.param(
        v2_file(
            f"/../../kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
            f"cri-containerd-{CID}.scope"
        ),
        (UID, CID),
        id="cgroup namespace relative systemd path gives the container",
    ),
    pytest.param(
        v2_file(f"/../../../besteffort/pod{UID}/{CID}"),
        (UID, CID),
        id="cgroup namespace relative cgroupfs path without kubepods gives the container",
    ),
    pytest.param(
        v2_file(f"/../pod{UID}/{CID}"),
        (UID, CID),
        id="cgroup namespace sibling pod gives the container",
    ),
    pytest.param(
        v2_file(f"{SYSTEMD_BURSTABLE}/cri-containerd-{CID}.scope/docker/{OTHER_CID}"),
        (UID, CID),
        id="docker in docker below a container gives the outer container",
    ),
    pytest.param(
        v2_file(
            f"{SYSTEMD_BURSTABLE}/cri-containerd-{CID}.scope/kubelet.slice/"
            "kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
            f"kubelet-kubepods-besteffort-pod{OTHER_UID_}.slice/cri-containerd-{OTHER_CID}.scope"
        ),
        (UID, CID),
        id="kubelet nested in a pod gives the outer pod this node knows",
    ),
    # --- canonical form ------------------------------------------------------------------------
    pytest.param(
        v2_file(f"/kubepods/besteffort/pod{UID.upper()}/{CID.upper()}"),
        (UID, CID),
        id="upper-case uid and container id come back lower-case",
    ),
    pytest.param(
        v2_file(f"/kubepods/besteffort/pod{UID}/{CID[:12]}"),
        (UID, CID[:12]),
        id="short hex container id is kept as it is",
    ),
    pytest.param(
        v2_file(f"/kubepods/besteffort/pod{UID}/sandbox"),
        (UID, None),
        id="non-hex container leaf gives the pod but no container",
    ),
    pytest.param(
        v2_file(f"{SYSTEMD_BURSTABLE}/cri-containerd-.scope"),
        (UID, None),
        id="empty container id gives no container rather than an empty string",
    ),
    pytest.param(
        v2_file(f"/kubepods-besteffort-pod{UID_}.slice:cri-containerd:"),
        (UID, None),
        id="empty literal container id gives no container rather than an empty string",
    ),
]

NOT_A_POD_CASES = [
    pytest.param(v2_file("/system.slice/sshd.service"), id="host service"),
    pytest.param(v2_file("/user.slice/user-1000.slice/session-3.scope"), id="login session"),
    pytest.param(v2_file("/init.scope"), id="init"),
    pytest.param(v2_file("/"), id="v2 root"),
    pytest.param(v1_file("/"), id="v1 host process at every root"),
    pytest.param(v2_file(f"/system.slice/docker-{CID}.scope"), id="plain docker container"),
    pytest.param(
        v2_file(f"/machine.slice/machine-libpod_pod_{NODE_CID}.slice/libpod-{CID}.scope"),
        id="podman pod is not a kubernetes pod",
    ),
    pytest.param(v2_file(f"/k8s.io/{CID}"), id="containerd namespace cgroup names no pod"),
    pytest.param(v2_file(f"/kubepods/besteffort/{UID}/{CID}"), id="uid without the pod prefix"),
    pytest.param(v2_file(f"/kubepods/besteffort/pod12345/{CID}"), id="pod segment too short"),
    pytest.param(
        v2_file(f"/kubepods/besteffort/pod{UID.replace('a', 'g')}/{CID}"),
        id="pod segment with a non-hex uid",
    ),
    pytest.param(
        v2_file(f"/kubepods/besteffort/pod{STATIC_UID}0/{CID}"),
        id="pod segment with 33 hex digits",
    ),
    pytest.param(
        v2_file(f"/machine.slice/libpod-{CID}.scope"),
        id="podman container scope (64 hex after pod)",
    ),
    pytest.param(
        v2_file(
            f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{STATIC_UID[:31]}.slice"
        ),
        id="static pod slice one digit short",
    ),
    pytest.param(
        v2_file(f"/kubepods/besteffort/pod{UID}0/{CID}"),
        id="pod segment with a uid and trailing junk",
    ),
    pytest.param(
        v2_file(f"/kubepods.slice/kubepods-besteffort.slice/other-pod{UID_}.slice"),
        id="uid slice outside kubepods",
    ),
    pytest.param("", id="empty text"),
    pytest.param("\n\n  \n", id="blank lines"),
    pytest.param("\x00\xff\ufffd\x7f garbage \x1b[31m", id="binary junk"),
    pytest.param(bytes(range(256)).decode("latin-1") * 8, id="every byte value"),
    pytest.param(f"/kubepods/pod{UID}/{CID}\n", id="path without hierarchy fields"),
    pytest.param(f"0:/kubepods/pod{UID}/{CID}\n", id="line with a single colon"),
    pytest.param(f"0::kubepods/pod{UID}/{CID}\n", id="relative path"),
    pytest.param(
        "0::/kubepods/pod" + UID + "/" + "a" * 100_000 + "\n",
        id="absurdly long line",
    ),
]


@pytest.mark.parametrize(("text", "expected"), POD_CASES)
def test_cgroup_file_names_the_pod_and_container(
    text: str, expected: tuple[str, str | None]
) -> None:
    assert parse_cgroup(text) == CgroupRef(pod_uid=expected[0], container_id=expected[1])


@pytest.mark.parametrize("text", NOT_A_POD_CASES)
def test_cgroup_file_outside_any_pod_gives_none(text: str) -> None:
    assert parse_cgroup(text) is None


def test_cgroup_v2_crio_container_leaf_gives_the_container() -> None:
    ref = parse_cgroup(f"0::{SYSTEMD_BURSTABLE}/crio-{CID}.scope/container\n")
    assert ref is not None
    assert ref.container_id == CID


def test_cgroup_crio_conmon_is_never_taken_as_the_container() -> None:
    ref = parse_cgroup(f"0::{SYSTEMD_BURSTABLE}/crio-conmon-{CID}.scope\n")
    assert ref == CgroupRef(pod_uid=UID, container_id=None)


def test_cgroup_systemd_escaped_uid_comes_back_with_dashes() -> None:
    ref = parse_cgroup(f"0::{SYSTEMD_BURSTABLE}/cri-containerd-{CID}.scope\n")
    assert ref is not None
    assert ref.pod_uid == UID


def test_cgroup_line_over_the_length_cap_does_not_hide_a_later_good_line() -> None:
    text = "12:pids:/" + "x" * 100_000 + "\n" + f"0::/kubepods/pod{UID}/{CID}\n"
    assert parse_cgroup(text) == CgroupRef(pod_uid=UID, container_id=CID)


def _mutate(rng: random.Random, text: str) -> str:
    """``text`` with one character dropped, doubled or replaced by a random one."""
    if not text:
        return text
    at = rng.randrange(len(text))
    edit = rng.randrange(3)
    if edit == 0:
        return text[:at] + text[at + 1 :]
    if edit == 1:
        return text[: at + 1] + text[at:]
    return text[:at] + chr(rng.randrange(0x20, 0x250)) + text[at + 1 :]


def test_cgroup_parse_never_raises_and_returns_only_well_formed_refs() -> None:
    rng = random.Random(20240601)
    prefixes = ["0::", "12:pids:", "1:name=systemd:", "", ":", "0:", "7:cpu,cpuacct:"]
    segments = [
        "", "..", "kubepods", "burstable", "kubepods.slice", "kubepods-besteffort.slice",
        f"pod{UID}", f"kubepods-burstable-pod{UID_}.slice", f"kubelet-kubepods-pod{UID_}.slice",
        f"pod{STATIC_UID}", f"kubepods-pod{STATIC_UID}.slice",
        f"kubepods-pod{UID_}.slice:cri-containerd:{CID}", CID, f"cri-containerd-{CID}.scope",
        f"crio-{CID}.scope", f"crio-conmon-{CID}.scope", f"docker-{CID}.scope", "container",
        "system.slice", "\x00", "pod", "-pod", ":",
    ]  # fmt: skip
    found = 0
    for _ in range(3000):
        lines = [
            rng.choice(prefixes) + "/" + "/".join(rng.choices(segments, k=rng.randint(0, 6)))
            for _ in range(rng.randint(0, 4))
        ]
        text = "\n".join(lines)
        for _ in range(rng.randint(0, 3)):
            text = _mutate(rng, text)
        ref = parse_cgroup(text)
        if ref is not None:
            found += 1
            assert CANONICAL_UID.fullmatch(ref.pod_uid), text
            assert ref.container_id is None or CONTAINER_ID.fullmatch(ref.container_id), text
    assert found > 300  # the generator does reach the interesting paths
