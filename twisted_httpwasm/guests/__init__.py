"""Guests bundled with twisted-httpwasm, as WebAssembly text compiled when loaded.

``demo.wat`` is the guest of the demo that ``twistd -n httpwasm`` serves without
arguments; :func:`twisted_httpwasm.web.demo.bundled_guest` names their files.
"""
