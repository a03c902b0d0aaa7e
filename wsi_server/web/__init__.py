"""The HTTP fronts: one module per protocol, each ``routes(ctx) -> list[BaseRoute]``.

``api`` (JSON slide API), ``deepzoom`` (DZI and tiles in both geometries), ``ops``
(health, readiness, metrics), and the viewer (``wsi_server.viewer``). A front parses its
own URLs and calls the services of the ``AppContext``; it never opens files, decodes or
encodes pixels, or keeps a cache of its own.
"""
