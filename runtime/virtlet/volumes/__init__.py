"""Pod volumes of VM containers: CRI ``mounts`` (directories shared into the guest, single files, scratch
disks) and CRI ``devices`` (block PVs, the persistent root).  See ``docs/volumes.md``.

``mounts.plan_mounts`` turns a container's CRI mounts into a validated ``MountPlan`` before anything is made;
``shares`` turns the plan into domain devices and the guest-side instructions on the config drive.
"""
