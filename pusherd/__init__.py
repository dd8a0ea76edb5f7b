"""pusherd: a real-time push daemon speaking the Phoenix Channels protocol."""

__version__ = "0.1.0"
