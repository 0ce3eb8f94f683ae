"""Process facts from a proc root: a fake tree in tmp_path, and this test's own /proc entry."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from gpufleet.exporter.errors import ExporterError
from gpufleet.exporter.podmap.cgroup import CgroupRef, parse_cgroup
from gpufleet.exporter.podmap.procfs import ProcessInfo, ProcFs, resolve_host_proc

UID = "9b810e76-6ec9-4286-a3ca-828dd5f4b3b2"
CID = "c381e88f38c0c8fd8712b8bc076f3787b9d179e06c0fd4f5f8130c4237730edf"
POD_CGROUP = (
    "0::/kubepods.slice/kubepods-burstable.slice/"
    f"kubepods-burstable-pod{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope\n"
)
# The kernel allows ')' and spaces in comm; stat parsers that split at the first
# ')' or on whitespace misread every field after it.
TRICKY_COMM = "python (gpu) x"


def stat_line(pid: int, comm: str, start_time: int) -> str:
    """A /proc/<pid>/stat line as the kernel writes it, with ``start_time`` as field 22."""
    after_comm = [
        "S", "1", str(pid), str(pid), "0", "-1", "4194560", "25000", "0", "12", "0",
        "310", "42", "0", "0", "20", "0", "8", "0", str(start_time), "12345678848",
        "40960", "18446744073709551615", "1", "1", "0", "0", "0", "0", "0", "16781312",
        "17642", "0", "0", "0", "17", "3", "0", "0", "0", "0", "0", "0", "0", "0", "0",
        "0", "0", "0", "0",
    ]  # fmt: skip
    return f"{pid} ({comm}) {' '.join(after_comm)}\n"


def status_text(comm: str, uid: int) -> str:
    """The head of a /proc/<pid>/status file, with real uid ``uid``."""
    return (
        f"Name:\t{comm}\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\nNgid:\t0\n"
        f"Pid:\t4242\nPPid:\t1\nTracerPid:\t0\n"
        f"Uid:\t{uid}\t{uid + 1}\t{uid + 2}\t{uid + 3}\n"
        "Gid:\t100\t100\t100\t100\nFDSize:\t64\nGroups:\t100 \nVmPeak:\t  123456 kB\n"
    )


def make_process(
    root: Path,
    pid: int,
    *,
    comm: str = TRICKY_COMM,
    start_time: int = 987654,
    uid: int = 1000,
    cmdline: bytes = b"python3\x00train.py\x00--epochs\x0010\x00",
    cgroup: str = POD_CGROUP,
) -> Path:
    """Write /proc/<pid>/{stat,status,cmdline,cgroup} under ``root``; the process directory."""
    base = root / str(pid)
    base.mkdir(parents=True, exist_ok=True)
    (base / "stat").write_text(stat_line(pid, comm, start_time))
    (base / "status").write_text(status_text(comm[:15], uid))
    (base / "cmdline").write_bytes(cmdline)
    (base / "cgroup").write_text(cgroup)
    return base


def make_unreadable(path: Path) -> None:
    """Replace ``path`` by a directory: reading it fails with an OSError even as root."""
    path.unlink()
    path.mkdir()


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    """An empty fake proc root."""
    root = tmp_path / "proc"
    root.mkdir()
    return root


def test_read_gives_every_field_of_a_pod_process(proc: Path) -> None:
    make_process(proc, 4242)
    fs = ProcFs(proc, user_name={1000: "alice"}.get)

    assert fs.read(4242) == ProcessInfo(
        pid=4242,
        start_time=987654,
        uid=1000,
        username="alice",
        command="python3 train.py --epochs 10",
        cgroup=CgroupRef(pod_uid=UID, container_id=CID),
    )


def test_start_time_is_field_22_even_when_comm_holds_spaces_and_parentheses(proc: Path) -> None:
    make_process(proc, 4242, comm="a) b ) (c", start_time=555)

    assert ProcFs(proc).start_time(4242) == 555


def test_start_time_of_a_vanished_pid_is_none(proc: Path) -> None:
    assert ProcFs(proc).start_time(4242) is None


def test_read_of_a_vanished_pid_is_none(proc: Path) -> None:
    assert ProcFs(proc).read(4242) is None


@pytest.mark.parametrize("name", ["stat", "status", "cmdline", "cgroup"])
def test_read_with_an_unreadable_file_is_none(proc: Path, name: str) -> None:
    make_unreadable(make_process(proc, 4242) / name)

    assert ProcFs(proc).read(4242) is None


@pytest.mark.parametrize("name", ["status", "cmdline", "cgroup"])
def test_read_of_a_process_that_exits_halfway_is_none(proc: Path, name: str) -> None:
    # A process that exits after its stat was read loses its other files.
    (make_process(proc, 4242) / name).unlink()

    assert ProcFs(proc).read(4242) is None


@pytest.mark.parametrize(
    "stat",
    [
        pytest.param("", id="empty"),
        pytest.param("4242 python S 1 2 3\n", id="no parentheses"),
        pytest.param("4242 (python) S 1 2 3\n", id="too few fields"),
        pytest.param(
            stat_line(4242, "python", 1).replace(" 1 12345678848", " x 1234"),
            id="start time not a number",
        ),
        pytest.param("4242 )python( S" + " 7" * 40 + "\n", id="parentheses reversed"),
    ],
)
def test_malformed_stat_gives_none(proc: Path, stat: str) -> None:
    (make_process(proc, 4242) / "stat").write_text(stat)
    fs = ProcFs(proc)

    assert (fs.start_time(4242), fs.read(4242)) == (None, None)


def test_status_without_a_uid_line_gives_none(proc: Path) -> None:
    (make_process(proc, 4242) / "status").write_text("Name:\tpython\nState:\tS (sleeping)\n")

    assert ProcFs(proc).read(4242) is None


def test_uid_is_the_real_uid_not_the_effective_one(proc: Path) -> None:
    make_process(proc, 4242, uid=2000)
    info = ProcFs(proc, user_name=lambda uid: None).read(4242)

    assert info is not None
    assert info.uid == 2000


def test_empty_cmdline_shows_comm_in_brackets(proc: Path) -> None:
    make_process(proc, 2, comm="kworker/0:1H", cmdline=b"")
    info = ProcFs(proc).read(2)

    assert info is not None
    assert info.command == "[kworker/0:1H]"


def test_cmdline_padded_with_nuls_after_setproctitle_has_no_trailing_spaces(proc: Path) -> None:
    make_process(proc, 4242, cmdline=b"worker: idle" + b"\x00" * 200)
    info = ProcFs(proc).read(4242)

    assert info is not None
    assert info.command == "worker: idle"


def test_cmdline_that_is_not_utf8_is_still_a_string(proc: Path) -> None:
    make_process(proc, 4242, cmdline=b"caf\xe9\x00--x\x00")
    info = ProcFs(proc).read(4242)

    assert info is not None
    assert info.command == "caf\ufffd --x"


def test_unknown_uid_is_named_by_its_number(proc: Path) -> None:
    make_process(proc, 4242, uid=54321)
    info = ProcFs(proc, user_name=lambda uid: None).read(4242)

    assert info is not None
    assert info.username == "54321"


def test_user_names_are_looked_up_once_per_uid(proc: Path) -> None:
    calls: list[int] = []

    def lookup(uid: int) -> str | None:
        calls.append(uid)
        return None if uid == 3000 else f"user{uid}"

    for pid, uid in [(10, 1000), (11, 1000), (12, 3000), (13, 3000), (14, 1000)]:
        make_process(proc, pid, uid=uid)
    fs = ProcFs(proc, user_name=lookup)

    for pid in [10, 11, 12, 13, 14, 10]:
        assert fs.read(pid) is not None
    assert calls == [1000, 3000]


def test_default_user_name_comes_from_the_passwd_database(proc: Path) -> None:
    make_process(proc, 4242, uid=0)
    info = ProcFs(proc).read(4242)

    assert info is not None
    assert info.username == pwd.getpwuid(0).pw_name


def test_non_pod_process_has_no_cgroup_ref(proc: Path) -> None:
    make_process(proc, 4242, cgroup="0::/system.slice/sshd.service\n")
    info = ProcFs(proc).read(4242)

    assert info is not None
    assert info.cgroup is None


def test_reused_pid_has_a_different_start_time(proc: Path) -> None:
    make_process(proc, 4242, start_time=1000)
    fs = ProcFs(proc)
    before = fs.start_time(4242)

    make_process(proc, 4242, start_time=2000, cmdline=b"other\x00")
    after = fs.read(4242)

    assert after is not None
    assert (before, after.start_time, after.command) == (1000, 2000, "other")


def test_pid_reused_while_being_read_is_not_reported_with_mixed_facts(proc: Path) -> None:
    base = make_process(proc, 4242, start_time=1000)

    def reuse_pid_meanwhile(uid: int) -> str:
        # The name lookup runs after the files are read: the PID now belongs to
        # a new process, so what was read may describe the old one.
        (base / "stat").write_text(stat_line(4242, "other", 2000))
        return "alice"

    assert ProcFs(proc, user_name=reuse_pid_meanwhile).read(4242) is None


def test_pids_lists_only_numeric_entries(proc: Path) -> None:
    for pid in (300, 7, 42):
        make_process(proc, pid)
    for name in ("self", "thread-self", "sys", "12a", "\u0661\u0662"):
        (proc / name).mkdir()

    assert ProcFs(proc).pids() == [7, 42, 300]


def test_pids_of_a_missing_root_names_the_root(tmp_path: Path) -> None:
    missing = tmp_path / "nothing"

    with pytest.raises(ExporterError, match=str(missing)):
        ProcFs(missing).pids()


def test_root_is_the_path_given(proc: Path) -> None:
    assert ProcFs(proc).root == proc


def test_read_of_this_process_matches_the_real_proc() -> None:
    pid = os.getpid()
    stat = Path(f"/proc/{pid}/stat").read_text()
    expected_start = int(stat.rsplit(")", 1)[1].split()[19])

    info = ProcFs(Path("/proc")).read(pid)

    assert info is not None
    assert info.pid == pid
    assert info.start_time == expected_start
    assert info.uid == os.getuid()
    assert "python" in info.command or "pytest" in info.command
    assert info.cgroup == parse_cgroup(Path(f"/proc/{pid}/cgroup").read_text())


def test_requested_host_proc_is_used_as_given(tmp_path: Path) -> None:
    assert resolve_host_proc(tmp_path) == tmp_path


def test_requested_host_proc_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "host" / "proc"

    with pytest.raises(ExporterError, match="--host-proc"):
        resolve_host_proc(missing)


def test_requested_host_proc_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "proc"
    not_a_dir.write_text("")

    with pytest.raises(ExporterError, match=str(not_a_dir)):
        resolve_host_proc(not_a_dir)


@pytest.mark.parametrize("entry", ["1", "self"])
def test_mounted_host_proc_is_preferred_when_it_looks_like_procfs(
    tmp_path: Path, entry: str
) -> None:
    host = tmp_path / "host" / "proc"
    (host / entry).mkdir(parents=True)

    assert resolve_host_proc(None, host=host, local=tmp_path / "local") == host


def test_mounted_host_proc_that_is_an_empty_directory_falls_back_to_local(tmp_path: Path) -> None:
    host = tmp_path / "host" / "proc"
    (host / "not-a-pid").mkdir(parents=True)
    local = tmp_path / "local"

    assert resolve_host_proc(None, host=host, local=local) == local


def test_missing_host_proc_falls_back_to_local(tmp_path: Path) -> None:
    local = tmp_path / "local"

    assert resolve_host_proc(None, host=tmp_path / "absent", local=local) == local


def test_default_fallback_is_this_machines_proc(tmp_path: Path) -> None:
    assert resolve_host_proc(None, host=tmp_path / "absent") == Path("/proc")
