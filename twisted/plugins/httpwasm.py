"""The ``twistd httpwasm`` plugin; everything it does is in :mod:`twisted_httpwasm.service.tap`.

No ``__init__.py`` here: Twisted finds plugins in every ``twisted/plugins``
directory on ``sys.path``.
"""

from twisted.application.service import ServiceMaker

HttpWasm = ServiceMaker(
    "httpwasm",
    "twisted_httpwasm.service.tap",
    "Run http-wasm middleware guests in front of a twisted.web resource.",
    "httpwasm",
)
