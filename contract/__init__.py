"""The hand-written half of puremesh's contract: what both ends of a wire must agree on and
the generated protobuf code cannot say. Written once here, imported by both trees.

Every module is pure (the standard library, numpy and torch; see docs/LAYOUT.md) and takes
plain values: the protobuf adapters live in the servicers and clients.
"""
