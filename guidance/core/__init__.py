"""The core: geometry, views, volumes, X-ray images, the DRR renderer and plan files.

Imports nothing above itself (no registration, sockets, simulator or screens).
"""
