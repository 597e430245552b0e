"""Delivery bookkeeping in Redis: results and the stream, start counts, quarantine, the reaper."""
