"""The sections of ``bench/bench_peers.py``, one module each: ``grpo_step`` (a GRPO step end to end, each peer in its
own process), ``losses`` (fused log-prob + policy losses), ``generation`` (rollout generation); ``common`` (the
report, peer lookup, defaults) and ``tables`` (README tables and the figure)."""
