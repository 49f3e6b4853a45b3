"""Learner settings: frozen pydantic models (ARCHITECTURE.md rule 5). Defaults follow S1 of
pure-algorithm.md, scaled to what the tiny CPU world can do where noted; the algorithm's
choices and defaults are trainer/algo/options.py's."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field, model_validator

from puremesh.contract.services import ServiceName
from puremesh.rpc.settings import ClientSecurity, FrozenSettings, ServerSecurity
from puremesh.weightsync.limits import WeightPlaneLimits
from puremesh.weightsync.nccl_sender import DEFAULT_CHUNK_BYTES as DEFAULT_NCCL_CHUNK_BYTES

from .algo.options import (
    DEFAULT_BASELINE,
    DEFAULT_CLIP_EPS,
    DEFAULT_CREDIT,
    DEFAULT_KL_COEF,
    DEFAULT_KL_ESTIMATOR,
    DEFAULT_NORMALIZE,
    DEFAULT_OFF_POLICY_CORRECTION,
    DEFAULT_REWARD_MODE,
    DEFAULT_TEMPERATURE,
    DEFAULT_TIS_CAP,
    DEFAULT_VR_COEF,
    BaselineKind,
    CreditMethod,
    KlEstimator,
    OffPolicyCorrection,
    RewardMode,
)
from .data import PRESETS, PromptTemplate, TemplatePreset
from .failover import FailoverSettings

ENV_PREFIX = "PUREMESH_LEARNER__"


class PolicyDtype(StrEnum):
    """Compute dtype of the policy's forward and backward passes (and of the reference and the
    published weights); the torch dtype's name. Master weights and optimizer state stay float32
    (trainer/sharding.py)."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


class DistributedBackend(StrEnum):
    """torch.distributed backend of the learner's ranks; auto = nccl on CUDA, gloo on CPU."""

    AUTO = "auto"
    GLOO = "gloo"
    NCCL = "nccl"


class AlgoSettings(FrozenSettings):
    """Credit assignment and the PPO objective (pure-algorithm.md sections 3-5)."""

    credit: CreditMethod = DEFAULT_CREDIT
    temperature: float = Field(
        DEFAULT_TEMPERATURE, gt=0, description="softmin temperature T of min-form credit"
    )
    reward_mode: RewardMode = DEFAULT_REWARD_MODE
    baseline: BaselineKind = DEFAULT_BASELINE
    kl_coef: float = Field(DEFAULT_KL_COEF, ge=0, description="beta: KL penalty in the token rewards")
    kl_estimator: KlEstimator = DEFAULT_KL_ESTIMATOR
    vr_coef: float = Field(DEFAULT_VR_COEF, ge=0, description="verifiable-reward coefficient")
    normalize: bool = Field(DEFAULT_NORMALIZE, description="batch normalisation of advantages")
    clip_eps: float = Field(DEFAULT_CLIP_EPS, gt=0, lt=1, description="PPO ratio clip")
    off_policy_correction: OffPolicyCorrection = Field(
        DEFAULT_OFF_POLICY_CORRECTION,
        description="weight of each token's PPO term against the behaviour log-probs the rollout "
        "returned: none, or tis (truncated importance sampling, trainer/algo/offpolicy.py)",
    )
    tis_cap: float = Field(DEFAULT_TIS_CAP, ge=1, description="C: the cap of the tis importance weights")
    update_dropout: bool = Field(
        False,
        description="dropout in the PPO update's forward passes; off by default, so the update "
        "starts at ratio 1. The old and reference log-prob passes never use dropout",
    )


class OptimSettings(FrozenSettings):
    lr: float = Field(5e-7, gt=0, description="Adam learning rate (constant)")
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0, description="max global gradient norm")
    epochs: int = Field(1, ge=1, description="passes over each rollout batch")
    minibatches: int = Field(2, ge=1, description="optimizer steps per pass (S1: 2 per rollout batch)")


class SamplingSettings(FrozenSettings):
    prompts_per_step: int = Field(64, ge=1, description="prompt groups per training step")
    samples_per_prompt: int = Field(4, ge=2, description="responses per prompt (n >= 2 for RLOO)")
    temperature: float = Field(0.5, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(2048, ge=1)
    groups_in_flight: int = Field(0, ge=0, description="groups generating at once; 0 = prompts_per_step")
    max_staleness: int = Field(0, ge=0, description="oldest usable sample, in policy versions; 0 = on-policy")


class EndpointSettings(FrozenSettings):
    """Where the services are (host:port lists; several rollout replicas allowed)."""

    rollout: list[str] = Field(default_factory=list)
    prm: list[str] = Field(default_factory=list)
    verify: list[str] = Field(default_factory=list)
    call_timeout_seconds: float = Field(600.0, gt=0, description="deadline of each attempt of a service call")
    failover: FailoverSettings = Field(
        default_factory=FailoverSettings,
        description="bounded fail-over and the failure policy (trainer/failover.py)",
    )
    applications: dict[ServiceName, str] = Field(
        default_factory=dict,
        description="Ray Serve application per service when its targets are Ray Serve gRPC proxies, "
        "sent as `application` metadata on every call (e.g. {rollout: rollout}); none = standalone",
    )
    # --- security (issue 13): how the learner reaches each service (README "Security") -------
    security: dict[ServiceName, ClientSecurity] = Field(
        default_factory=dict,
        description="TLS (tls_ca, tls_cert/tls_key for mTLS, tls_server_name) and the token file of "
        "each service's endpoints (e.g. {prm: {tls_ca: ca.crt, token_file: prm.token}}); none = "
        "plaintext without tokens",
    )


class WeightServerSettings(ServerSecurity):
    """The learner's WeightService (gRPC control plane) and its bulk data plane (plain TCP).
    Security (issue 13; ServerSecurity's fields, README "Security"): tls_cert/tls_key (TLS on both
    planes), tls_client_ca (mTLS), auth_tokens (the subscriber tokens), insecure."""

    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="WeightService port; 0 picks a free one")
    retain_versions: int = Field(2, ge=1)
    chunk_bytes: int = Field(4 << 20, ge=1024, description="FetchWeights chunk size")
    bulk_chunk_bytes: int = Field(
        1 << 20, ge=1024, description="chunk size of the CRC-32s that check the bulk data plane"
    )
    bulk: bool = Field(
        True,
        description="also serve the tensor bytes over the bulk data plane (plain TCP on `host`, "
        "announced to the replicas; FetchWeights stays the fallback)",
    )
    bulk_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="bulk data plane port; 0 picks a free one. Fix it when replicas reach the learner "
        "through a Kubernetes Service, which must expose this same port number",
    )
    bulk_advertise_host: str = Field(
        "",
        description="host announced for the bulk port; empty = each replica connects to the host of "
        "its own weights_target (e.g. the learner Service's name)",
    )
    limits: WeightPlaneLimits = Field(
        default_factory=WeightPlaneLimits,
        description="memory, thread and time bounds of the weight plane (weightsync/limits.py)",
    )
    bulk_tls: bool = Field(
        True,
        description="with tls_cert, the bulk port speaks TLS too; false keeps its bytes in the clear "
        "(faster; still authenticated by the tokens' handshake and checked by the SHA-256)",
    )
    nccl: bool = Field(
        False,
        description="also offer the replicas an NCCL group each (GPU clusters; README 'Weights over NCCL'): "
        "versions are announced with TRANSPORT_NCCL, the bulk port stays the fallback; ignored (warned) "
        "where this process has no CUDA or NCCL",
    )
    nccl_device: str = Field("cuda", description="the CUDA device the learner sends NCCL weights from")
    nccl_chunk_bytes: int = Field(
        DEFAULT_NCCL_CHUNK_BYTES,
        ge=1 << 20,
        description="pieces of an NCCL send (one staging buffer of this size on nccl_device)",
    )


class DistributedSettings(FrozenSettings):
    """The learner's ranks (trainer/ranks.py): one under `puremesh up/train`, N under torchrun."""

    backend: DistributedBackend = DistributedBackend.AUTO
    collective_timeout_seconds: float = Field(
        600.0,
        gt=0,
        description="bound of every collective of an update, publish or checkpoint (and of the "
        "rendezvous): a rank that died or hung ends the run with an error after at most this long",
    )
    command_timeout_seconds: float = Field(
        3600.0,
        gt=0,
        description="how long ranks other than 0 wait for rank 0's next command: longer than a "
        "step's collection plus a held-out evaluation",
    )


class MemorySettings(FrozenSettings):
    """What bounds the learner's memory (trainer/batching.py, trainer/sharding.py)."""

    micro_batch_tokens: int = Field(
        16384,
        ge=1,
        description="token budget of one forward (and backward) pass: rows x padded length; "
        "gradients accumulate over a minibatch's micro-batches. A longer row runs alone",
    )
    activation_checkpointing: bool = Field(
        False, description="recompute each decoder layer's activations in the backward pass"
    )


class PromptSettings(FrozenSettings):
    """The prompt around each question, in training and the held-out evaluation alike
    (trainer/data.py PromptTemplate; `puremesh eval` takes the same as flags). A template
    without {question} is refused."""

    preset: TemplatePreset = Field(
        TemplatePreset.TINYWORLD, description="pure (PURE's prompt) or tinyworld (the tiny policy's)"
    )
    template: str = Field("", description="a format string with {question}; replaces the preset's")
    chat_template: bool = Field(
        False, description="wrap the prompt as the user turn of the policy tokenizer's chat template"
    )
    system_prompt: str = Field("", description="the chat template's system turn (needs chat_template)")

    @model_validator(mode="after")
    def _check(self) -> PromptSettings:
        self.prompt_template()
        return self

    def prompt_template(self) -> PromptTemplate:
        return PromptTemplate(self.template or PRESETS[self.preset], self.chat_template, self.system_prompt)


class EvalSettings(FrozenSettings):
    heldout_path: str = Field("", description="held-out problems (JSONL or parquet); empty = no eval")
    n_eval: int = Field(500, ge=1)
    every_steps: int = Field(0, ge=0, description="evaluate every N steps; 0 = only before and after")
    max_new_tokens: int = Field(256, ge=1)


# --- PURE's data setting and the experiment trackers (issue 11) -------------------------------


class TrackerKind(StrEnum):
    """Experiment trackers that receive each step's metrics (trainer/metrics.py `Trackers`)."""

    WANDB = "wandb"
    TENSORBOARD = "tensorboard"


class WandbMode(StrEnum):
    """auto: online when W&B credentials are configured (WANDB_API_KEY, or WANDB_MODE=online),
    else offline (a local run folder that `wandb sync` uploads later)."""

    AUTO = "auto"
    ONLINE = "online"
    OFFLINE = "offline"


class TrackingSettings(FrozenSettings):
    """Options of the trackers named in `learner.trackers`."""

    project: str = Field("puremesh", min_length=1, description="W&B project")
    run_name: str = Field("", description="the run's name in the trackers; empty = out_dir's folder name")
    directory: str = Field("", description="where the trackers write; empty = OUT/trackers")
    wandb_mode: WandbMode = WandbMode.AUTO


class LearnerSettings(FrozenSettings):
    policy_path: str = Field(..., description="local directory of the starting policy (and reference)")
    train_path: str = Field(..., description="training problems (JSONL or parquet, PURE layout)")
    out_dir: str = Field(
        "runs/latest", description="checkpoints, metrics.jsonl, heldout/step-N.jsonl (the held-out outputs)"
    )
    steps: int = Field(100, ge=1)
    seed: int = 0
    device: str = Field(
        "cpu", description='"cpu" or "cuda" (each rank takes cuda:LOCAL_RANK; "cuda:N" pins one rank)'
    )
    dtype: PolicyDtype = PolicyDtype.FLOAT32
    checkpoint_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus port; None = off")
    algo: AlgoSettings = AlgoSettings()
    optim: OptimSettings = OptimSettings()
    sampling: SamplingSettings = SamplingSettings()
    endpoints: EndpointSettings = EndpointSettings()
    weights: WeightServerSettings = WeightServerSettings()
    eval: EvalSettings = EvalSettings()
    prompt: PromptSettings = PromptSettings()
    distributed: DistributedSettings = DistributedSettings()
    memory: MemorySettings = MemorySettings()
    ground_truth_fraction: float = Field(
        1.0,
        ge=0,
        le=1,
        description="share of the training prompts that keep their ground truth (chosen with `seed`); "
        'the others are trained as PURE\'s "null" answer, on process rewards alone (trainer/data.py)',
    )
    trackers: list[TrackerKind] = Field(
        default_factory=list, description="experiment trackers (wandb, tensorboard); none by default"
    )
    tracking: TrackingSettings = TrackingSettings()

    @model_validator(mode="after")
    def _check(self) -> LearnerSettings:
        per_step = self.sampling.prompts_per_step * self.sampling.samples_per_prompt
        if self.optim.minibatches > per_step:
            raise ValueError(
                f"optim.minibatches ({self.optim.minibatches}) exceeds the {per_step} responses per step"
            )
        return self
