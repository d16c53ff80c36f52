"""predict: numbers from the derived forms, fast — collectives (α-β), hardware presets, compute (roofline),
placement (which link a group crosses), latency (TTFT, TPOT, E2E) and layout advice. numpy only: no torch, no
DeepSpeed (a test keeps it so; ``llmcomm predict`` and ``llmcomm advise`` run where torch cannot be imported)."""
