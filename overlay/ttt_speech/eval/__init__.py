"""Evaluation: per-frame NLL of long-form audio past the attention window, and its report."""
