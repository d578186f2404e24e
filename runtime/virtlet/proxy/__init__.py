"""virtlet-criproxy: one CRI endpoint for the kubelet in front of containerd (primary) and virtletd.

Modules: ``config`` (flags + YAML), ``naming`` (id and image-name prefixes, pure), ``routing`` (which
backend a call goes to, pure), ``rewrite`` (prefixing ids inside CRI messages, pure), ``backends``
(channels, version probing, error relaying), ``servicer`` (the CRI methods), ``main`` (process entry).
"""
