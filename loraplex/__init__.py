"""loraplex: the `loraplex` command and the generated gRPC contract (`loraplex.v1`)."""
