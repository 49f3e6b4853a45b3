"""Shared service plumbing: server bootstrap, status-code table, settings, metrics, clients."""
