"""The shared RPC runtime under both trees (docs/LAYOUT.md).

errors    domain errors and the one table that maps them to gRPC status codes
server    ServiceHost: one grpc.aio server with health, reflection, admission, metrics
client    channels, deadlines, bounded retries, the base of every service client
settings  the frozen settings base and the YAML < environment < flags loader
metrics   the RPC metrics and the /metrics endpoint
"""
