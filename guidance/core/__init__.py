"""The core: geometry, views, volumes and their downsampling, X-ray images, the DRR renderer
and plan files; and two runtime helpers: thread settings and a signal-safe stop request.

Imports nothing above itself (no registration, sockets, simulator or screens).
"""
