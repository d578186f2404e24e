"""CreateContainer, StartContainer, StopContainer and RemoveContainer as domain operations (the crash-safety
rules they follow are in ``virtlet.vm.manager``'s module doc)."""

from __future__ import annotations

import logging
import os
import time
import uuid

from virtlet import errors, failpoints, preconditions
from virtlet.images import names
from virtlet.images.records import repo_tags
from virtlet.state import store as st
from virtlet.vm import guest as gu
from virtlet.vm import guest_exit, termination, vcpu_plug
from virtlet.vm.annotations import MIN_MEMORY_BYTES, cpu_set, parse_cpu_list
from virtlet.vm.base import EXIT_ERROR, EXIT_OK, ContainerSpec, ResourceUpdate
from virtlet.vm.exits import VmExits

log = logging.getLogger("virtlet.vm.manager")

ACPI_REPEAT = 1.0  # seconds between ACPI power-button presses while StopContainer waits for the guest


class VmLifecycle(VmExits):
    # -- CreateContainer ------------------------------------------------------------------------------
    def create(self, spec: ContainerSpec) -> st.ContainerRecord:
        sandbox = self.store.require_sandbox(spec.sandbox_id)
        preconditions.sandbox_ready("CreateContainer", sandbox.id, sandbox.state)
        if not spec.image:
            raise errors.InvalidArgument("container config: image.image is required")
        image = self.parts.image_status(spec.image)
        if image is None:
            raise errors.NotFound(f"image {spec.image!r} is not present; pull it first (PullImage)")
        # ContainerStatus shows the name the pod asked for; the kubelet usually sends the image id PullImage
        # answered, which as containerd is shown as the image's first repo tag (the id is in image_ref)
        tags = repo_tags(image) if names.digest_of(spec.image.removeprefix(names.PREFIX)) else []
        cid = str(uuid.uuid4())
        cdir = self.container_dir(cid)
        rec = st.ContainerRecord(
            id=cid, sandbox_id=spec.sandbox_id, name=spec.name, attempt=spec.attempt, state=st.CONTAINER_CREATED,
            created_at=st.now_ns(), image=(tags or [spec.image])[0], image_ref=image.digest, log_path=spec.log_path,
            labels=dict(spec.labels), annotations=dict(spec.annotations), config=spec.config,
            extra={"domain": self.domain_name(cid), "dir": str(cdir), "image_path": str(image.path),
                   "creating": True})
        # a refused request must not cost the pod its unstarted container: every check before the replacement
        self.parts.validate(spec, sandbox)
        self._check_root_device_free(spec)
        self._replace_unstarted(spec.sandbox_id)
        with self._lock(cid):
            self.store.add_container(rec)  # checks: sandbox READY, no other live container
            try:
                failpoints.hit("container.create.after_record")
                cdir.mkdir(parents=True)
                # The directory holds the seed ISO (user-data, the pod's environment) and the guest's disk.  QEMU runs
                # as its own user (libvirt-qemu), which libvirt's dynamic ownership gives the disk and the ISO at start,
                # but it must still search this directory to open them: 0711 (no listing for others) is the tightest
                # mode that works; 0700 would stop the VM from starting.  The ISO itself is 0600.
                cdir.chmod(0o711)

                def define(xml: str) -> None:  # while qemu-img still makes the overlay (parts.prepare)
                    failpoints.hit("container.create.after_prepare")
                    self._undefine_exited_domains(spec.sandbox_id)
                    failpoints.hit("container.before_define")
                    gu.define(self.host, xml)

                extra = self.parts.prepare(cid, spec, sandbox, image, cdir, self.console_socket(cid), define)
                failpoints.hit("container.create.after_define")
                done = {k: v for k, v in {**rec.extra, **extra}.items() if k != "creating"}
                rec = self.store.update_container(cid, extra=done)
            except BaseException:
                self._destroy_everything(cid)
                self.store.delete_container(cid)
                raise
        log.info("container %s created in sandbox %s (domain %s)", cid, spec.sandbox_id, self.domain_name(cid))
        return rec

    def _replace_unstarted(self, sandbox_id: str) -> None:
        """Remove containers of the sandbox that are CREATED and were never started (see the module doc: the
        kubelet gave up on them, and a VM pod holds one container)."""
        for old in self.store.list_containers(sandbox_id):
            if old.state == st.CONTAINER_CREATED:
                log.warning("CreateContainer in sandbox %s replaces container %s (%s attempt %d), created and never "
                            "started (a timed-out or retried CreateContainer)", sandbox_id, old.id, old.name,
                            old.attempt)
                with self._lock(old.id):  # waits for a create of it still in progress
                    current = self.store.get_container(old.id)
                    if current is not None and current.state == st.CONTAINER_CREATED:
                        self.remove(old.id)

    def _check_root_device_free(self, spec: ContainerSpec) -> None:
        """A persistent root device boots one VM at a time: a CREATED or RUNNING container of another pod on the
        same device (a RWO block PV is per node, so two pods of a node may both get it) is refused."""
        root = next((d for d in spec.devices if os.path.normpath(d.container_path) == "/"), None)
        if root is None:
            return
        real = os.path.realpath(root.host_path)
        for other in self.store.list_containers():
            dev = other.extra.get("root_device")
            if dev and os.path.realpath(str(dev)) == real and other.sandbox_id != spec.sandbox_id and \
                    other.state in (st.CONTAINER_CREATED, st.CONTAINER_RUNNING):
                raise errors.FailedPrecondition(
                    f"persistent root device {root.host_path!r} is in use by container {other.id} of pod sandbox "
                    f"{other.sandbox_id}; stop or remove that pod first")

    def _undefine_exited_domains(self, sandbox_id: str) -> None:
        """A restarted container reuses the pod's domain UUID (= SMBIOS UUID): the exited one's domain must go
        first.  Its record, files and log stay until the kubelet removes the container."""
        for old in self.store.list_containers(sandbox_id):
            if old.state != st.CONTAINER_EXITED:
                continue
            guest = self._guest(old.id)
            if guest is not None and not guest.is_active():
                try:
                    guest.undefine()
                except errors.Internal as exc:
                    log.warning("cannot undefine exited domain of %s: %s", old.id, exc)

    # -- StartContainer -------------------------------------------------------------------------------
    def start(self, cid: str) -> None:
        with self._lock(cid):
            rec = self.store.require_container(cid)
            if rec.state == st.CONTAINER_RUNNING:
                return
            if rec.state != st.CONTAINER_CREATED:
                raise errors.FailedPrecondition(f"container {cid} is {rec.state}; only a CREATED container starts")
            sandbox = self.store.require_sandbox(rec.sandbox_id)
            guest = self._guest(cid)
            if guest is None:
                raise errors.FailedPrecondition(f"container {cid}: its libvirt domain is gone; remove it")
            self._start_log_writer(rec, sandbox)
            failpoints.hit("container.start.after_log_writer")
            if self._domain_active(cid):  # started by an earlier call whose reply was lost: adopt it
                self._adopt_running(cid, sandbox)
                return
            self.parts.taps_before_start(sandbox)
            failpoints.hit("container.start.after_taps")
            guest_exit.reset(guest_exit.exit_file(self.container_dir(cid)))  # no report of an earlier run counts
            t_create = time.monotonic()
            try:
                guest.start()
            except errors.Internal as exc:
                self.parts.after_exit(sandbox)
                self.store.update_container(cid, state=st.CONTAINER_EXITED, finished_at=st.now_ns(),
                                            exit_code=EXIT_ERROR, reason="StartError", message=str(exc))
                self._stop_log_writer(cid)
                raise errors.Internal(f"container {cid}: {exc}") from exc
            qemu_ms = (time.monotonic() - t_create) * 1000
            failpoints.hit("container.start.after_domain_start")
            self._adopt_running(cid, sandbox)
            # QEMU's own share of StartContainer (libvirt's domain create: process, firmware load, devices, until
            # the domain runs); bench/pod_start.py reads this line to tell it apart from virtletd's part
            log.info("container %s started: QEMU start %.1f ms", cid, qemu_ms)

    def _adopt_running(self, cid: str, sandbox: st.SandboxRecord) -> None:
        """The domain of a CREATED container runs: put its taps on the pod network, record RUNNING."""
        self.parts.after_start(sandbox)  # idempotent: taps already in the pod netns stay
        failpoints.hit("container.start.after_attach")
        self.store.update_container(cid, state=st.CONTAINER_RUNNING, started_at=st.now_ns())
        # an exit event may have raced with the update above: make the state agree with libvirt
        self._reconcile(cid)

    # -- StopContainer --------------------------------------------------------------------------------
    def stop(self, cid: str, timeout: int) -> None:
        with self._lock(cid):
            rec = self.store.get_container(cid)
            if rec is None or rec.state in (st.CONTAINER_EXITED,):
                return
            if rec.state == st.CONTAINER_CREATED:
                self.store.update_container(cid, state=st.CONTAINER_EXITED, finished_at=st.now_ns(),
                                            exit_code=EXIT_OK, reason="Completed", message="never started")
                return
            self._stop_requested.add(cid)
            if not rec.extra.get("stop_requested"):
                rec = self.store.update_container(cid, extra={**rec.extra, "stop_requested": True})
            guest = self._guest(cid)
            if guest is not None and guest.is_active():
                deadline = time.monotonic() + max(timeout, 0)
                self._copy_termination_message(rec, guest, timeout)
                self._press_power_button(cid, guest, deadline)
                if self._domain_active(cid):
                    log.info("container %s did not shut down within %ss; destroying the VM", cid, timeout)
                    rec = self.store.update_container(cid, extra={**rec.extra, "stop_destroying": timeout})
                    try:
                        guest.destroy()
                    except errors.Internal as exc:
                        if self._domain_active(cid):
                            raise errors.Internal(f"container {cid}: {exc}") from exc
                failpoints.hit("container.stop.after_domain_stopped")
            self._mark_exited(cid, *self._stopped_status(rec))


    def _copy_termination_message(self, rec: st.ContainerRecord, guest: gu.Guest, timeout: int) -> None:
        """The guest's termination log -> the kubelet's file, while the agent still answers (best effort)."""
        term = rec.extra.get("termination_log")
        if not isinstance(term, dict):
            return
        termination.collect(guest.agent_transport(), str(term.get("guest", "")), str(term.get("host", "")),
                            rec.name, termination.budget_for(timeout))

    def _press_power_button(self, cid: str, guest: gu.Guest, deadline: float) -> None:
        """Press the ACPI power button every ``ACPI_REPEAT`` seconds until the VM is off or ``deadline`` passes.

        Why repeat: a press while the guest boots (firmware, or a kernel whose ACPI button driver or acpid is not up
        yet) is lost, and one press is all a guest gets from libvirt.  A guest already shutting down ignores the
        extra presses; one that ignores the button altogether sees one per second until the grace period ends."""
        first = True
        while True:
            refused = False
            try:
                guest.shutdown()
            except errors.Internal as exc:
                refused = True
                if first:  # libvirt refused the button (no ACPI): there is nothing to wait for
                    log.info("ACPI shutdown of %s refused (%s); destroying", cid, exc)
            if first:
                failpoints.hit("container.stop.after_shutdown_request")
                if refused:
                    return
                first = False
            elif refused and not self._domain_active(cid):  # went off between the check and the press
                return
            press_by = min(deadline, time.monotonic() + ACPI_REPEAT)
            while time.monotonic() < press_by and self._domain_active(cid):
                with self._exited:
                    self._exited.wait(max(0.0, min(0.25, press_by - time.monotonic())))
            if time.monotonic() >= deadline or not self._domain_active(cid):
                return

    # -- UpdateContainerResources ---------------------------------------------------------------------
    def update_resources(self, cid: str, upd: ResourceUpdate) -> dict[str, int | str]:
        """Apply what QEMU can change live: the memory through the balloon (at most the memory the VM was created
        with: its ``<memory>``, no hot-plug), vCPUs hot-plugged for a CPU limit above the VM's vCPUs (up to
        ``VirtletMaxVCPUs``: ``virtlet.vm.vcpu_plug``), the host CPUs its vCPUs and emulator threads are pinned to
        (``cpuset_cpus``: the kubelet's static CPU manager sends it) and the whole VM's CPU shares/quota/period
        (libvirt's scheduler parameters, the same the designer sets at create).  A VM that is off (CREATED) gets
        the change in its definition.  Returns the resources now in force as CRI names them (also kept in
        ``extra["resources"]`` for ContainerStatus).  Nothing is answered OK that was not applied: a value out of
        range is ``InvalidArgument`` before anything changes; libvirt refusing is ``FailedPrecondition`` saying what
        was applied before (memory first, then vCPUs, pinning, then the CPU parameters)."""
        with self._lock(cid):
            rec = self.store.require_container(cid)
            if rec.state == st.CONTAINER_EXITED:
                raise errors.FailedPrecondition(f"container {cid} is EXITED: its VM is off; nothing to update")
            max_bytes = int(rec.extra.get("memory_bytes") or 0)
            if upd.memory_limit_bytes and max_bytes and upd.memory_limit_bytes > max_bytes:
                raise errors.InvalidArgument(
                    f"UpdateContainerResources: linux.memory_limit_in_bytes {upd.memory_limit_bytes} is more than "
                    f"the {max_bytes} bytes this VM was created with; a VM's memory can shrink and grow back live "
                    f"(balloon) but not past that maximum: recreate the pod for more")
            if upd.memory_limit_bytes and upd.memory_limit_bytes < MIN_MEMORY_BYTES:
                raise errors.InvalidArgument(
                    f"UpdateContainerResources: linux.memory_limit_in_bytes {upd.memory_limit_bytes} is too little "
                    f"for a VM (at least {MIN_MEMORY_BYTES} bytes, 32Mi)")
            in_force = dict(rec.extra.get("resources") or {})
            pin = ""
            if upd.cpuset_cpus:  # validated before anything changes; the same list again changes nothing
                pin = parse_cpu_list(upd.cpuset_cpus, self.parts.host_cpus)
                if pin == str(in_force.get("cpuset_cpus") or rec.extra.get("cpuset") or ""):
                    pin = ""
            period = upd.cpu_period or int(in_force.get("cpu_period") or 0)
            plug = vcpu_plug.plan(cid, rec.extra, upd.cpu_quota, period)  # more vCPUs for a higher CPU limit
            guest = self._guest(cid)
            if guest is None:
                raise errors.FailedPrecondition(f"container {cid}: its libvirt domain is gone; remove it")
            cpu: dict[str, int] = {}
            if upd.cpu_shares > 0:
                cpu["cpu_shares"] = upd.cpu_shares
            if upd.cpu_quota:  # the whole VM's quota, as at create (designer); < 0: no limit
                cpu["global_quota"] = upd.cpu_quota if upd.cpu_quota > 0 else -1
            if upd.cpu_period > 0:
                cpu["global_period"] = upd.cpu_period
            done: list[str] = []
            extra = dict(rec.extra)
            try:
                if upd.memory_limit_bytes:
                    guest.set_memory(upd.memory_limit_bytes // 1024)
                    in_force["memory_limit_in_bytes"] = upd.memory_limit_bytes
                    done.append("memory")
                if plug is not None:
                    guest.set_vcpus(plug)
                    extra["vcpus"] = plug
                    done.append(f"{plug} vCPUs")
                    if guest.is_active() and vcpu_plug.online_in_guest(guest.agent_transport(), plug, rec.name) < plug:
                        vcpu_plug.online_in_background(guest.agent_transport(), plug, rec.name)
                if pin:
                    guest.set_cpu_pinning(cpu_set(pin), self.parts.host_cpus,
                                          int(extra.get("max_vcpus") or extra.get("vcpus") or 1))
                    in_force["cpuset_cpus"] = pin
                    done.append(f"pinning to CPUs {pin}")
                if cpu:
                    guest.set_cpu_tune(cpu)
                    in_force.update({"cpu_shares": upd.cpu_shares or in_force.get("cpu_shares", 0),
                                     "cpu_quota": upd.cpu_quota or in_force.get("cpu_quota", 0),
                                     "cpu_period": upd.cpu_period or in_force.get("cpu_period", 0)})
            except errors.Internal as exc:
                applied = f" (applied before it: {', '.join(done)})" if done else " (nothing was applied)"
                raise errors.FailedPrecondition(f"container {cid}: {exc}{applied}") from exc
            finally:
                if in_force != (rec.extra.get("resources") or {}) or extra != rec.extra:
                    self.store.update_container(cid, extra={**extra, "resources": in_force})
            log.info("container %s resources updated: %s", cid, in_force)
            return in_force

    # -- RemoveContainer ------------------------------------------------------------------------------
    def remove(self, cid: str) -> None:
        with self._lock(cid):
            rec = self.store.get_container(cid)
            if rec is None:
                self._destroy_everything(cid)  # idempotent: leftovers of an unknown id go too
                return
            self._stop_requested.add(cid)
            self._destroy_everything(cid)
            failpoints.hit("container.remove.after_destroy")
            if rec.state in (st.CONTAINER_RUNNING, st.CONTAINER_CREATED):
                self._mark_exited(cid, EXIT_OK, "Completed", "removed")
                sandbox = self.store.get_sandbox(rec.sandbox_id)
                if sandbox is not None:
                    self.parts.after_exit(sandbox)
            self.store.delete_container(cid)
            self._stop_requested.discard(cid)
            self.stats.forget(cid)

    def remove_all_in_sandbox(self, sandbox_id: str) -> None:
        for rec in self.store.list_containers(sandbox_id):
            self.remove(rec.id)

    def stop_all_in_sandbox(self, sandbox_id: str) -> None:
        for rec in self.store.list_containers(sandbox_id):
            if rec.state in (st.CONTAINER_RUNNING, st.CONTAINER_CREATED):
                self.stop(rec.id, 10)

