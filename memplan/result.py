"""The one result type every estimator returns: bytes per category at the peak, its phase, three views."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from memplan.options import Attention, Config, Dtype, Method, Scheme, _Choice

from memplan.units import GIB, MIB, gib  # noqa: F401  (imported from here by other modules)


class Category(_Choice):
    """Where bytes go. Traced, analytic and measured results line up key for key."""

    WEIGHTS = "weights", "model parameters and buffers (frozen and trainable)"
    GRADIENTS = "gradients", ".grad of trainable parameters"
    OPTIMIZER_STATE = "optimizer_state", "momentum, exp_avg, exp_avg_sq, ZO gradient accumulators"
    ACTIVATIONS = "activations", "hidden states saved for backward, or live in a forward"
    PERTURBATION = "perturbation", "ZO direction vectors z and their temporaries"
    TANGENTS = "tangents", "forward-gradient tangent vector and dual activations"
    LOGITS = "logits", "logits and loss buffers (often upcast to fp32)"
    COMMUNICATION = "communication", "all-gather / reduce-scatter / all-reduce bucket buffers of sharded training"
    WORKSPACE = "workspace", "cuBLAS / cuBLASLt workspaces (allocated through torch)"
    CONTEXT = "context", "CUDA context: device view only"
    ALLOCATOR = "allocator", "reserved minus allocated: caching-allocator slack"


class Phase(_Choice):
    """Parts of a training step; the peak is the max over them."""

    LOAD = "load", "weights on the device, state from the previous step"
    FORWARD = "forward", "a forward pass (each ZO forward, the FG dual forward)"
    BACKWARD = "backward", "backprop: gradients appear while activations free"
    OPTIMIZER_STEP = "optimizer_step", "the update, with its temporaries"
    PERTURB = "perturb", "ZO: weights moved along z"


class Tier(_Choice):
    """Which estimator counted the tensor bytes."""

    ANALYTIC = "analytic", "closed-form phases per component: microseconds, no torch"
    TRACE = "trace", "the real training step on fake tensors on the CPU: exact tensor bytes"
    MEASURED = "measured", "the real step on a GPU (calibration records)"


class GpuRef(BaseModel):
    """The GPU a verdict is judged against."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    name: str
    total_bytes: int
    family: str = ""
    detected: bool = False


class Estimate(BaseModel):
    """Peak memory of one configuration, by category, with its phase and verdict."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    model: str = Field(description="Resolved model id.")
    method: Method
    scheme: Scheme
    dtype: Dtype
    batch: int
    seq: int
    attention: Attention
    tier: Tier = Tier.ANALYTIC
    peak_phase: Phase
    components: dict[Category, int] = Field(description="Bytes per category at the peak (device view).")
    phases: dict[Phase, int] = Field(default_factory=dict, description="Peak allocated bytes of each phase.")
    peak_allocated_bytes: int = Field(description="What torch.cuda.max_memory_allocated would report.")
    peak_reserved_bytes: int = Field(description="What torch.cuda.max_memory_reserved would report.")
    peak_device_bytes: int = Field(description="What NVML / nvidia-smi would show: reserved + context.")
    host_bytes: int = Field(0, description="Host (CPU) memory the step needs beyond the framework's own: "
                            "offloaded activations, optimizer state or parameters, paged optimizer state.")
    trainable_params: int = 0
    total_params: int = 0
    gpu: GpuRef | None = None
    fits: bool | None = None
    headroom_bytes: int | None = None
    max_batch: int | None = Field(None, description="Largest batch that fits at this seq (0: none).")
    max_seq: int | None = Field(None, description="Largest seq that fits at this batch (0: none).")
    correction: str | None = Field(None, description="Overhead correction applied (calibration source).")
    warnings: list[str] = Field(default_factory=list)
    config: Config | None = Field(None, description="The configuration estimated, every option as given "
                                  "(model as typed; `model` above is the resolved id).")

    def to_json_dict(self) -> dict:
        return self.model_dump(mode="json")
