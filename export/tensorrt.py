"""TensorRT: build a bare ``.plan`` from the exported ONNX, its JSON sidecar, and a runner.

The plan file holds exactly what ``builder.build_serialized_network`` returned (no header:
``trtexec``, Triton and ``trt.Runtime`` load it as is). Everything lipdet needs to know about it
sits beside it in ``<name>.plan.json`` (:class:`lipdet.artifacts.PlanSidecar`): TensorRT version, GPU name and compute capability it was
built for, precision, optimisation profile, and the source ONNX path and sha256 (the
differentiable twin is rebuilt from that ONNX, refused if its hash changed).

Version handling: TensorRT 11 networks are always strongly typed and the network-creation flags
are gone (create the network with flags ``0``); TensorRT 10 still needs the ``STRONGLY_TYPED``
flag (and accepts the deprecated ``EXPLICIT_BATCH``) for the graph's own fp16 / Q/DQ types to be
obeyed. Precision is never chosen with builder flags: it is in the ONNX (:mod:`lipdet.export.precision`).

A plan only deserialises on the same TensorRT version and GPU model it was built for:
:func:`check_sidecar` refuses a mismatch with one line before TensorRT is asked to load it.

Nothing in this module needs TensorRT to import; :func:`trt_missing` says what is missing.
"""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path
from typing import Any

import torch

from lipdet.artifacts import PlanProfile, PlanSidecar, SourceOnnx
from lipdet.errors import LipdetError
from lipdet.io import cache_dir, sha256_file, write_bytes_atomic

INSTALL_HINT = "pip install 'lipdet[gpu]'"
DEFAULT_WORKSPACE_MB = 1024


# ----------------------------------------------------------------------------------------------
# availability


def trt_missing() -> str | None:
    """None if TensorRT can build and run engines here; else one line saying what is missing."""
    missing = []
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        missing.append("the 'tensorrt' Python package is not installed")
    except Exception as e:  # a broken install (missing libnvinfer, CUDA mismatch)
        missing.append(f"the 'tensorrt' package failed to import ({type(e).__name__}: {str(e)[:120]})")
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible (torch.cuda.is_available() is False)")
    if not missing:
        return None
    return (
        "TensorRT needs an NVIDIA GPU and the tensorrt package: "
        + "; ".join(missing)
        + f". On a CUDA machine install them with: {INSTALL_HINT}"
    )


def require_trt() -> None:
    """Raise the one-line LipdetError of :func:`trt_missing` if TensorRT cannot run here."""
    msg = trt_missing()
    if msg:
        raise LipdetError(msg)


def trt_version() -> str:
    import tensorrt as trt

    return str(trt.__version__)


def current_env(device: int = 0) -> dict[str, str] | None:
    """``{"tensorrt", "gpu", "compute_capability"}`` of this machine, or None without TRT + GPU."""
    if trt_missing():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return {"tensorrt": trt_version(), "gpu": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}


def network_flags(trt: Any) -> int:
    """Network-creation flags for the installed TensorRT module ``trt``.

    TensorRT >= 11: 0 (always strongly typed, the flags are gone or ignored). TensorRT 10:
    ``STRONGLY_TYPED`` (so the fp16 / Q/DQ types in the ONNX decide precision) plus the
    deprecated ``EXPLICIT_BATCH`` where it still exists.
    """
    major = int(str(trt.__version__).split(".")[0])
    if major >= 11:
        return 0
    flag_enum = trt.NetworkDefinitionCreationFlag
    flags = 0
    for name in ("EXPLICIT_BATCH", "STRONGLY_TYPED"):
        member = getattr(flag_enum, name, None)
        if member is not None:
            flags |= 1 << int(member)
    return flags


# ----------------------------------------------------------------------------------------------
# sidecar


def make_sidecar(
    *,
    env: dict[str, str],
    precision: str,
    int8_flavour: str | None,
    input_name: str,
    input_size: int,
    min_batch: int,
    opt_batch: int,
    max_batch: int,
    onnx_path: Path,
    onnx_sha256: str,
    workspace_bytes: int,
    timing_cache: str | None,
    parity: dict[str, float] | None = None,
) -> PlanSidecar:
    """The sidecar of a plan just built (batches in images, ``input_size`` in pixels, workspace in bytes)."""
    shape = lambda n: (int(n), 3, int(input_size), int(input_size))  # noqa: E731
    return PlanSidecar(
        built_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        tensorrt=env["tensorrt"], gpu=env["gpu"], compute_capability=env["compute_capability"],
        precision=precision, int8_flavour=int8_flavour,
        profile=PlanProfile(input=input_name, min=shape(min_batch), opt=shape(opt_batch), max=shape(max_batch)),
        max_batch=int(max_batch), input_size=int(input_size),
        source_onnx=SourceOnnx(path=str(Path(onnx_path).resolve()), sha256=onnx_sha256),
        workspace_bytes=int(workspace_bytes), timing_cache=timing_cache, parity=parity,
    )


def check_sidecar(side: PlanSidecar, env: dict[str, str] | None, plan: str | Path = "plan") -> None:
    """Refuse a plan that cannot load here: no TensorRT/GPU, another TensorRT version, another GPU.

    ``env`` is :func:`current_env` (None when TensorRT or the GPU is missing).
    """
    if env is None:
        raise LipdetError(
            f"{plan} is a TensorRT {side.tensorrt} engine for {side.gpu}; running it needs that GPU and "
            f"TensorRT here: {trt_missing() or 'TensorRT unavailable'}"
        )
    if side.tensorrt != str(env["tensorrt"]):
        raise LipdetError(
            f"{plan} was built with TensorRT {side.tensorrt} but this machine has TensorRT {env['tensorrt']}; "
            "plans only load on the version that built them -- rebuild it here with: lipdet export MODEL.pt --trt"
        )
    if side.gpu != str(env["gpu"]) or side.compute_capability != str(env["compute_capability"]):
        raise LipdetError(
            f"{plan} was built for {side.gpu} (compute capability {side.compute_capability}) but this GPU is "
            f"{env['gpu']} ({env['compute_capability']}); rebuild it here with: lipdet export MODEL.pt --trt"
        )


def source_onnx(side: PlanSidecar, plan: str | Path) -> Path:
    """The ONNX a plan was built from, checked against the sidecar's sha256.

    Looks at the recorded absolute path, then for a file of the same name beside the plan (a
    folder moved as a whole). LipdetError if missing or changed.
    """
    plan = Path(plan)
    recorded = Path(side.source_onnx.path)
    candidates = [recorded, plan.parent / recorded.name]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise LipdetError(f"{plan}: its source ONNX {recorded} is missing (looked beside the plan too)")
    digest = sha256_file(found)
    if digest != side.source_onnx.sha256:
        raise LipdetError(
            f"{plan}: source ONNX {found} has changed since the plan was built (sha256 {digest[:12]}... != "
            f"{side.source_onnx.sha256[:12]}...); re-export both with: lipdet export MODEL.pt --trt"
        )
    return found


# ----------------------------------------------------------------------------------------------
# build


def default_timing_cache(env: dict[str, str]) -> Path:
    """Per TensorRT version and GPU timing-cache file under lipdet's cache folder."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{env['tensorrt']}-{env['gpu']}-sm{env['compute_capability']}").strip("-")
    folder = cache_dir() / "tensorrt"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"timing-{slug}.cache"


def build_plan(
    onnx_path: str | Path,
    plan_out: str | Path,
    *,
    input_size: int,
    max_batch: int = 64,
    opt_batch: int | None = None,
    precision: str = "fp32",
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    timing_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Parse ``onnx_path`` and write a serialized engine to ``plan_out``.

    One optimisation profile on ``images``: batch ``1 .. max_batch`` (optimised for ``opt_batch``,
    default ``max_batch``). Workspace limited to ``workspace_mb``. The timing cache is read from
    and written back to ``timing_cache`` (default: :func:`default_timing_cache`). For fp32 graphs
    TF32 is switched off so the engine stays within fp32 parity of the ONNX.

    Returns build facts: ``{"env", "input_name", "opt_batch", "workspace_bytes", "timing_cache"}``.
    """
    require_trt()
    import tensorrt as trt

    env = current_env()
    assert env is not None
    if max_batch < 1:
        raise LipdetError(f"max_batch must be >= 1, got {max_batch}")
    opt = int(opt_batch or max_batch)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise LipdetError(f"TensorRT could not parse {onnx_path}: {errors[0] if errors else 'unknown error'}")
    if network.num_inputs != 1:
        raise LipdetError(f"expected one network input, TensorRT sees {network.num_inputs}")
    input_name = network.get_input(0).name

    config = builder.create_builder_config()
    workspace = int(workspace_mb) << 20
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    dims = lambda n: (n, 3, input_size, input_size)  # noqa: E731
    profile.set_shape(input_name, dims(1), dims(min(opt, max_batch)), dims(max_batch))
    config.add_optimization_profile(profile)

    cache_file = Path(timing_cache) if timing_cache else default_timing_cache(env)
    blob = cache_file.read_bytes() if cache_file.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, True)  # ignore_mismatch: a cache from another device is skipped, not fatal

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise LipdetError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    Path(plan_out).write_bytes(memoryview(serialized))
    try:
        write_bytes_atomic(cache_file, bytes(memoryview(config.get_timing_cache().serialize())))
    except (OSError, LipdetError):
        pass  # a read-only cache folder only costs build time next time
    return {
        "env": env,
        "input_name": input_name,
        "opt_batch": min(opt, max_batch),
        "workspace_bytes": workspace,
        "timing_cache": str(cache_file),
    }


# ----------------------------------------------------------------------------------------------
# run


class TrtRunner:
    """Runs a plan on torch CUDA tensors: ``runner(images_cpu) -> (loc, logits)`` float32 on the CPU.

    Uses the name-based I/O API (``num_io_tensors``, ``set_input_shape``, ``set_tensor_address``,
    ``execute_async_v3`` on torch's current CUDA stream). Batches above the profile's maximum are
    split.
    """

    def __init__(self, plan: str | Path, device: int = 0) -> None:
        require_trt()
        import tensorrt as trt

        self._trt = trt
        self.device = torch.device("cuda", device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(self.device):
            self.engine = self.runtime.deserialize_cuda_engine(Path(plan).read_bytes())
            if self.engine is None:
                raise LipdetError(f"{plan}: TensorRT could not deserialize the plan (built for another version/GPU?)")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(self.device)  # TensorRT warns against the legacy default stream
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(self.inputs) != 1 or not {"loc", "logits"} <= set(self.outputs):
            raise LipdetError(f"{plan}: expected input 'images' and outputs 'loc', 'logits'; engine has {names}")
        self.input_name = self.inputs[0]
        lo, _, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])

    def _dtype(self, name: str) -> torch.dtype:
        dt = self.engine.get_tensor_dtype(name)
        table = {self._trt.DataType.FLOAT: torch.float32, self._trt.DataType.HALF: torch.float16}
        for attr, tdt in (("BF16", torch.bfloat16), ("INT32", torch.int32), ("INT8", torch.int8), ("INT64", torch.int64)):
            if hasattr(self._trt.DataType, attr):
                table[getattr(self._trt.DataType, attr)] = tdt
        if dt not in table:
            raise LipdetError(f"engine tensor {name} has unsupported dtype {dt}")
        return table[dt]

    @torch.no_grad()
    def run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        locs, logits = [], []
        for chunk in images.split(self.max_batch):
            loc, cls = self._run_one(chunk)
            locs.append(loc)
            logits.append(cls)
        return torch.cat(locs), torch.cat(logits)

    __call__ = run

    def _run_one(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            x = x.to(self.device, dtype=self._dtype(self.input_name), non_blocking=False).contiguous()
            if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
                raise LipdetError(f"engine refuses input shape {tuple(x.shape)} (profile batch {self.min_batch}..{self.max_batch})")
            self.context.set_tensor_address(self.input_name, x.data_ptr())
            outs: dict[str, torch.Tensor] = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                outs[name] = torch.empty(shape, dtype=self._dtype(name), device=self.device)
                self.context.set_tensor_address(name, outs[name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise LipdetError("TensorRT execution failed (execute_async_v3 returned False)")
            self.stream.synchronize()
        return outs["loc"].float().cpu(), outs["logits"].float().cpu()
