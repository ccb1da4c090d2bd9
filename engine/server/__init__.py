"""The engine's gRPC servers: Inference (token path) and EngineAdmin (residency)."""
