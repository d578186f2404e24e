"""Pod sandboxes: the record, the network namespace and the pod network of one VM pod."""
