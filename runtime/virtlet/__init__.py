"""virtlet: Kubernetes pods that are QEMU/KVM virtual machines."""

from importlib import metadata

try:
    __version__ = metadata.version("virtlet")
except metadata.PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+source"
