"""Evaluation: code benchmarks (MBPP, HumanEval) scored by running each program in a sandboxed
subprocess, and pass@k with the unbiased estimator. See docs/evaluation.md."""
