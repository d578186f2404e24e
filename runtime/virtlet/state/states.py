"""The names of sandbox and container states (see ``virtlet.state.store`` for the state machine).

A module of its own so that ``virtlet.preconditions`` can name them without importing the store, which uses
those checks itself.
"""

SANDBOX_CREATING = "CREATING"
SANDBOX_READY = "READY"
SANDBOX_NOTREADY = "NOTREADY"

CONTAINER_CREATED = "CREATED"
CONTAINER_RUNNING = "RUNNING"
CONTAINER_EXITED = "EXITED"
CONTAINER_UNKNOWN = "UNKNOWN"
