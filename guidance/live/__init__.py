"""The live application: wire messages, ZeroMQ transport (CURVE keys, throttled logging),
recording, pipeline, display client."""
