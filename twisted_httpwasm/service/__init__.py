"""twistd wiring: the plugin's options and service (``tap``) and the worker processes of ``--workers``."""
