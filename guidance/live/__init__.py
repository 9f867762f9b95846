"""The live application: wire messages, ZeroMQ transport, recording, pipeline, display client."""
