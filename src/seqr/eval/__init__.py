"""Experiments to one JSON, tables and figures from that JSON, the end-to-end demo."""
