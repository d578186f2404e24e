"""VM containers: libvirt domains, overlays, console logs and KVM detection."""
