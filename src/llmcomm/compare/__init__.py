"""compare: measured beside predicted — the sweeps the chapters run, the time model's validation, the calibration of
the ``cpu-local`` preset from this machine's own measurements. The only package that imports both ``predict`` and
``measure`` (a test keeps it so)."""
