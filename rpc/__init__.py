"""The shared RPC runtime under both trees (docs/LAYOUT.md).

errors    domain errors and the one table that maps them to gRPC status codes
server    ServiceHost: one grpc.aio server with health, reflection, admission, metrics
interceptor  the host's one interceptor: token check, admission, status table, RPC metrics
auth      bearer tokens, TLS credentials, the refusal of exposed plaintext binds
client    channels, deadlines, bounded retries, the base of every service client
settings  the frozen settings base and the YAML < environment < flags loader
metrics   the RPC metrics and the /metrics endpoint
"""
