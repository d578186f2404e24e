"""The CRI streaming server: ``kubectl attach`` and ``kubectl port-forward`` for VM pods.

The kubelet asks virtletd (CRI ``Attach``/``PortForward``) for a URL, then proxies the client's upgraded
connection to it.  This package serves those URLs: ``server`` accepts the HTTP upgrade, ``spdy``/``spdy_conn``
and ``websocket`` speak the two transports, ``remotecommand`` and ``portforward`` the two Kubernetes protocols
on top, ``tokens`` keeps the single-use URLs and ``backend`` connects them to VM consoles and pod networks.
``client`` is a small SPDY client (used by ``virtletctl`` and the tests).  See ``docs/streaming.md``.
"""
