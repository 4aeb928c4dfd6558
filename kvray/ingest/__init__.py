"""Event transport: ZMQ sockets in both topologies and replay requests."""
