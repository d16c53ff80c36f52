"""measure: real runs — the capture of every collective, the launcher (one supervisor, ports, shm cleanup), the
rank entry points (``runs/``), the collectives microbenchmark and the compute timings of this machine. Imports torch
and DeepSpeed (inside functions and rank processes); never imports ``predict`` or ``compare`` (a test keeps it so)."""
