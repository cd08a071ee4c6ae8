"""Benchmarks that print figures and write them to JSON (``slotserve bench``)."""
