"""Generated from proto/loraplex/v1/*.proto by `make protos`; do not edit."""
