"""virtlet: Kubernetes pods that are QEMU/KVM virtual machines."""

from __future__ import annotations


def __getattr__(name: str) -> str:
    # ``__version__`` is looked up on first use: importing ``importlib.metadata`` costs about 40 ms, paid by every
    # process that imports any virtlet module (the per-pod DHCP server, which RunPodSandbox waits for, among them).
    if name != "__version__":
        raise AttributeError(f"module 'virtlet' has no attribute {name!r}")
    from importlib import metadata

    try:
        version = metadata.version("virtlet")
    except metadata.PackageNotFoundError:  # running from a source tree without install
        version = "0.0.0+source"
    globals()["__version__"] = version
    return version
