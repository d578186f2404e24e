"""virtletctl: ssh, VNC, console, metadata and diagnostics for VM pods.  See ``docs/virtletctl.md``."""
