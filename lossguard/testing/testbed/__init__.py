"""A realistic offline testbed: a small Llama pretrained here on the text every Python install
ships, the fine-tuning tasks cut from that text, and fine-tuning scenarios run by a real Trainer.

- ``base.load_base()``: the committed pretrained base (1.3M parameters, BPE tokenizer), fresh per call;
- ``tasks``: instruction pairs, an imbalanced classification, preference pairs, prompt masking;
- ``scenarios.SCENARIOS`` / ``run_scenario``: healthy and troubled fine-tunes with known causes.

Rebuild the base with ``scripts/pretrain_base.py``; see docs/benchmarks.md ("Testbed").
"""
