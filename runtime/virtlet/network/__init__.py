"""Pod networking for VM pods: network namespaces, CNI, tap/bridge plumbing and the per-pod DHCP server."""
