"""Weight sync: the learner publishes policy versions, rollout replicas pull them (weights.proto;
docs/LAYOUT.md). The wire's hand-written half is contract/weights.py and contract/bulk.py.

Learner side (built side by side by the composition root, cli/learner.py):
    store.py        WeightStore: versions (stored.py), bounded buffers, revocation, readers
    checksums.py    the SHA-256s and CRC-32s computed once per published version
    replicas.py     what the learner knows about each replica: subscriptions, complete
                    transfers, confirmations, expiry; the publish barrier
    runs.py         the run identity: run id and highest announced version (OUT/run.json)
    servicer.py     WeightServicer: the gRPC WeightService over the store
    bulk_server.py  BulkServer: the bulk data plane, reading the store through a Protocol
                    (its socket helpers: bulk_wire.py)
    bulk_auth.py    the bulk port's TLS and authenticated handshake, both ends
    nccl_sender.py  NcclSender: one NCCL group per replica, the sends over them (OpenNcclGroup,
                    SendNccl; groups and their threads: nccl_group.py)
    limits.py       WeightPlaneLimits: the settings that bound all of the above

Replica side:
    fetcher.py      WeightFetcher: watch, current version, download through a transport, confirm
    transport.py    the Transport interface; grpc_stream.py, tcp_bulk.py (+ bulk_receiver.py)
                    and nccl.py (+ nccl_group.py)
    subscriber.py   WeightSubscriber: keeps a WeightSink (the rollout engine) on the newest version
"""
