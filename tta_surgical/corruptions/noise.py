"""Corruptions: noise (filled in by the corruption engine work)."""
