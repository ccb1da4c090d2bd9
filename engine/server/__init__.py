"""The engine's gRPC servers: Inference (token path) and EngineAdmin (residency); on
CUDA the public port is served by a front-end process of its own (`frontend.py`)."""
