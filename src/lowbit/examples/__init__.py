"""Runnable examples; each has a test that CI runs."""
