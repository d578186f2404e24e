"""Start-up recovery: finish or undo what a killed virtletd left (see ``virtlet.vm.manager``'s module doc and
docs/recovery.md), and remove domains, directories and sockets that belong to no record."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from virtlet import errors
from virtlet.state import store as st
from virtlet.vm import designer
from virtlet.vm import guest as gu
from virtlet.vm.base import EXIT_ERROR
from virtlet.vm.lifecycle import VmLifecycle

log = logging.getLogger("virtlet.vm.manager")


class VmRecovery(VmLifecycle):
    # -- start-up recovery ----------------------------------------------------------------------------
    def recover(self) -> None:
        known = {rec.id: rec for rec in self.store.list_containers()}
        for name in self.host.domain_names():
            cid = self._cid_of_domain(name)
            if cid is not None and cid not in known and self._is_ours(name):
                log.warning("removing domain %s: it belongs to no known container", name)
                self._destroy_everything(cid)
        for path in self.containers_dir.iterdir():
            if path.name not in known:
                log.warning("removing %s: it belongs to no known container", path)
                shutil.rmtree(path, ignore_errors=True)
        for sock in self.console_dir.glob("*.sock"):
            if sock.stem not in known:
                sock.unlink(missing_ok=True)
        for rec in list(known.values()):
            if rec.state == st.CONTAINER_CREATED and rec.extra.get("creating"):
                log.warning("removing container %s: its CreateContainer never replied", rec.id)
                self._destroy_everything(rec.id)
                self.store.delete_container(rec.id)
                del known[rec.id]
        for rec in known.values():
            sandbox = self.store.get_sandbox(rec.sandbox_id)
            if rec.state == st.CONTAINER_CREATED and sandbox is not None and self._domain_active(rec.id):
                log.warning("container %s: its StartContainer never replied but the VM runs; adopting it", rec.id)
                self._start_log_writer(rec, sandbox)
                self._adopt_running(rec.id, sandbox)
                continue
            if rec.state == st.CONTAINER_RUNNING:
                self._reconcile(rec.id)
                rec = self.store.require_container(rec.id)
                sandbox = self.store.get_sandbox(rec.sandbox_id)
                if rec.state == st.CONTAINER_RUNNING and sandbox is not None:
                    self._start_log_writer(rec, sandbox)
                    self.parts.after_start(sandbox)  # idempotent: taps a killed virtletd left in the host netns
                    log.info("container %s found running again", rec.id)
            elif rec.state == st.CONTAINER_CREATED and self._guest(rec.id) is None:
                self._mark_exited(rec.id, EXIT_ERROR, "Error", "the VM's libvirt domain disappeared")
            elif rec.state == st.CONTAINER_CREATED and sandbox is not None:
                self.parts.after_exit(sandbox)  # taps a StartContainer killed before QEMU started left behind

    def _is_ours(self, name: str) -> bool:
        """A virtlet domain is this virtletd's when its files live under our containers dir (or it carries no
        virtlet metadata at all, as a half-made domain may not).  Another virtletd with its own state dir on the
        same libvirt (tests, a second instance) keeps its domains."""
        guest = gu.lookup(self.host, name)
        if guest is None:
            return False
        try:
            meta = designer.virtlet_metadata(guest.xml())
        except (errors.Internal, ValueError) as exc:
            log.warning("cannot read domain %s: %s", name, exc)
            return False
        overlay = (meta or {}).get("overlay", "")
        if not overlay:
            return True
        if Path(overlay).parent.parent == self.containers_dir:
            return True
        log.info("leaving domain %s alone: its files are under %s, not %s", name, overlay, self.containers_dir)
        return False

