"""Where the kubelet may ask the CSI plugin to mount: its own per-pod CSI volume directories only.

A publish target is the one place the plugin writes to the host, as root, so a target must be
exactly where the kubelet puts an inline CSI volume of a pod::

    <kubelet dir>/pods/<pod uid>/volumes/kubernetes.io~csi/<volume name>/mount

The path must be absolute and already normal (no ``.``, ``..`` or empty components, no NUL),
`<pod uid>` must be the uid of the pod the request names, `<volume name>` a DNS-1123 label (a
pod's volume name), and no directory from the kubelet dir down to the target may be a symlink:
the resolved parent must be the same place, so a link planted in a pod's directory cannot send
the bind mount elsewhere. The kubelet dir itself may be a symlink (some distributions move
``/var/lib/kubelet``); it is resolved once when the checker is made.

Every refusal is an `InvalidVolumeError` (INVALID_ARGUMENT) that names the path and the rule.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from gpufleet.kcache.errors import InvalidVolumeError

__all__ = ["CSI_PLUGIN_DIR", "PublishTarget", "TargetChecker"]

CSI_PLUGIN_DIR = "kubernetes.io~csi"
"""The kubelet's directory of CSI volumes in a pod's ``volumes/`` (the escaped plugin name)."""
_MOUNT = "mount"
_PATH_MAX = 4096
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_POD_UID = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9]{0,62}[A-Za-z0-9])?")


@dataclass(frozen=True, slots=True)
class PublishTarget:
    """A checked target path and what it says: the pod's uid and its name for the volume."""

    path: Path
    pod_uid: str
    volume_name: str


class TargetChecker:
    """Checks target paths against the layout of the kubelet under `kubelet_dir`."""

    def __init__(self, kubelet_dir: Path) -> None:
        self.kubelet_dir = Path(os.path.normpath(os.fspath(kubelet_dir)))
        self._pods = self.kubelet_dir / "pods"

    def check(
        self, target_path: str, *, pod_uid: str | None = None, require_parent: bool = True
    ) -> PublishTarget:
        """The target `target_path` names; `pod_uid` (from the pod info) must match when given.

        Raises `InvalidVolumeError` for a path outside the kubelet's CSI volume directories,
        one that is not normal, one for another pod, or one that crosses a symlink; and, with
        `require_parent` (publish), one whose parent the kubelet has not made. Unpublish
        accepts a missing parent: the kubelet may have cleaned up before it retries.
        """
        target = self._layout(target_path)
        if pod_uid is not None and target.pod_uid != pod_uid:
            raise InvalidVolumeError(
                f"target_path {target_path!r} is in the directory of pod uid {target.pod_uid},"
                f" not of the pod the volume is for ({pod_uid})"
            )
        self._no_symlinks(target, require_parent=require_parent)
        return target

    def _layout(self, target_path: str) -> PublishTarget:
        if not target_path:
            raise InvalidVolumeError("target_path is required")
        if "\0" in target_path or len(target_path) > _PATH_MAX:
            raise InvalidVolumeError("target_path holds a NUL or is longer than PATH_MAX")
        if not target_path.startswith("/"):
            raise InvalidVolumeError(f"target_path {target_path!r} is not absolute")
        normal = os.path.normpath(target_path)
        if normal != target_path or target_path.startswith("//"):
            raise InvalidVolumeError(
                f"target_path {target_path!r} is not normalised (it would be {normal!r})"
            )
        path = Path(normal)
        expected = f"{self._pods}/<pod uid>/volumes/{CSI_PLUGIN_DIR}/<volume name>/{_MOUNT}"
        try:
            parts = path.relative_to(self._pods).parts
        except ValueError:
            raise InvalidVolumeError(
                f"target_path {target_path!r} is outside the kubelet's pods directory; expected"
                f" {expected}"
            ) from None
        if len(parts) != 5 or parts[1] != "volumes" or parts[2] != CSI_PLUGIN_DIR:
            raise InvalidVolumeError(f"target_path {target_path!r} is not of the form {expected}")
        uid, _, _, volume_name, last = parts
        if last != _MOUNT:
            raise InvalidVolumeError(f"target_path {target_path!r} is not of the form {expected}")
        if not _POD_UID.fullmatch(uid):
            raise InvalidVolumeError(f"target_path {target_path!r}: {uid!r} is not a pod uid")
        if not _DNS_LABEL.fullmatch(volume_name):
            raise InvalidVolumeError(
                f"target_path {target_path!r}: volume name {volume_name!r} is not a DNS-1123 label"
            )
        return PublishTarget(path=path, pod_uid=uid, volume_name=volume_name)

    def _no_symlinks(self, target: PublishTarget, *, require_parent: bool) -> None:
        resolved_root = Path(os.path.realpath(self.kubelet_dir))
        relative = target.path.relative_to(self.kubelet_dir)
        current = self.kubelet_dir
        for part in relative.parts:
            current = current / part
            try:
                mode = current.lstat().st_mode
            except FileNotFoundError:
                break
            except OSError as exc:
                raise InvalidVolumeError(
                    f"target_path {target.path}: {current}: {exc.strerror}"
                ) from None
            if stat.S_ISLNK(mode):
                raise InvalidVolumeError(
                    f"target_path {target.path}: {current} is a symlink; refusing to follow it"
                )
            if not stat.S_ISDIR(mode):
                raise InvalidVolumeError(f"target_path {target.path}: {current} is not a directory")
        parent = target.path.parent
        if not parent.is_dir():
            if not require_parent:
                return
            raise InvalidVolumeError(
                f"target_path {target.path}: its parent {parent} does not exist (the kubelet"
                " makes it before it publishes)"
            )
        if Path(os.path.realpath(parent)) != resolved_root / relative.parent:
            raise InvalidVolumeError(
                f"target_path {target.path}: its parent resolves to {os.path.realpath(parent)}"
            )
