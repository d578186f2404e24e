"""CRI runtime.v1 bindings made by tools/gen_protos.py from protos/runtime/v1/api.proto."""
