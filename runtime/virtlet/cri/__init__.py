"""The CRI face of virtletd: generated runtime.v1 bindings, servicers, the gRPC server and version aliases."""
