"""Weight sync: the learner publishes policy versions, rollout replicas pull them (docs/LAYOUT.md)."""
