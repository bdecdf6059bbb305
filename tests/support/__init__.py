"""Helpers the tests share (processes they start, what they read from them)."""
