"""derive: what a framework sends, symbolically (sympy) — patterns as data, one phase convention, closed forms, and the
one compiled evaluator that turns them into numbers. Imports neither torch nor DeepSpeed (a test keeps it so)."""
