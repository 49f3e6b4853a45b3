"""puremesh: PURE (min-form credit assignment) RL fine-tuning as a mesh of gRPC services.

The `puremesh` namespace is assembled from the repository's top-level folders:
puremesh.cli (cli/), puremesh.services (services/), puremesh.trainer (trainer/) and the
generated protobuf packages puremesh.<svc>.v1 (protos/puremesh/<svc>/v1/).
"""

__version__ = "0.1.0"
