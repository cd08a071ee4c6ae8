"""The kernel, below everything else: errors, settings, requests and records, events, the
mailbox, tickets and reply channels, text streaming, pure policies and memory telemetry.

Nothing here imports the backends, the actors or the faces above them (tests/test_layers.py).
"""
