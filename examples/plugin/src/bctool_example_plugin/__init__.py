"""An example bctool plugin: one entry of every kind, each in its own module.

bctool imports a module only when a command reads that kind (``bctool train --method
cos-to-old`` imports ``method.py``, never ``export.py``).
"""
