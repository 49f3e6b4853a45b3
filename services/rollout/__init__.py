"""The rollout service: samples responses from the current policy, tagged with its version.

engine.py      the backend-neutral interface (`Engine`): validation, versions, shutdown
gate.py        the read-write gate that keeps weight swaps out of running generations
sink.py        where a backend delivers finished samples (`SampleSink`)
hf_engine.py   transformers `generate` in a worker thread (the CPU default, "hf")
vllm_engine.py vLLM's engine core, in process, stepped by a dedicated thread ("vllm")
wire.py        protobuf <-> contract (`SamplingSpec`, `Sample`, `FinishReason` of
               contract/sampling.py), for the servicer and the client

The engines are the only code of this service that touches model weights (ARCHITECTURE.md rule 2);
the gRPC servicer and the weight subscriber sit on top of `Engine`.
"""
