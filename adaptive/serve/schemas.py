"""The bodies of the server's requests and responses, for its OpenAPI schema (``/openapi.json``)
and for FastAPI's validation of the small JSON bodies. ``/infer`` is parsed by
:mod:`adaptive.serve.oip` (it may carry binary tensors); its models here only document it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                   "INT64", "FP16", "FP32", "FP64", "BYTES"]


class Error(BaseModel):
    error: str


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: Datatype
    shape: list[int] = Field(description="-1: any size")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="the model's variants; each, and \"1\" (the "
                                            "model at the variant memadapt chooses), is a "
                                            "version the versioned routes take")
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: Datatype
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data_size: bytes of this tensor after the JSON header")
    data: list[Any] | None = Field(None, description="row-major, flat or nested")


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = Field(None, description="binary_data: true/false")


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data_output: every output as binary data")
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: Datatype
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str = Field(description="the variant that served (whatever version the "
                                           "request named)")
    id: str | None = None
    parameters: dict[str, Any] = Field(
        description="memadapt_variant: the variant that served; memadapt_cold: whether the "
                    "request waited for a load")
    outputs: list[ResponseOutput]


class IndexRequest(BaseModel):
    ready: bool | None = None


class IndexEntry(BaseModel):
    name: str
    version: str = Field(description="the resident variant, empty when none is")
    state: Literal["READY", "UNAVAILABLE"]
    reason: str | None = None


class LoadRequest(BaseModel):
    parameters: dict[str, Any] | None = None


class Loaded(BaseModel):
    name: str
    variant: str = Field(description="the variant resident after the load (not pinned: "
                                     "memadapt may change or shed it later)")


class Unloaded(BaseModel):
    name: str


class BudgetRequest(BaseModel):
    budget: int | str = Field(description="bytes, a size such as \"512MiB\", or a budget "
                                          "source: \"cgroup\", \"cuda-free\"")


_PLAN_BUDGET = ("what the policy plans with: the budget less the headroom kept for one "
                "load's transient peak")
_RESIDENT_BYTES = "charged bytes: sessions in service and draining, loads under way"


class Budget(BaseModel):
    budget_bytes: int
    plan_budget_bytes: int = Field(description=_PLAN_BUDGET)
    resident_bytes: int = Field(description=_RESIDENT_BYTES)
    source: str
    resident: dict[str, str] = Field(description="model -> the variant in service; a model "
                                     "whose variant is still loading is not listed")


class PlannedModel(BaseModel):
    model: str
    resident: str | None
    planned: str | None
    floor: float
    rate: float
    memory_bytes: int


class PlanView(BaseModel):
    budget_bytes: int
    plan_budget_bytes: int = Field(description=_PLAN_BUDGET)
    resident_bytes: int = Field(description=_RESIDENT_BYTES)
    planned_bytes: int
    objective: str
    models: list[PlannedModel]


#: request bodies: documented in the OpenAPI schema, parsed by hand (``app._json``, ``oip``)
BODY_ONLY = (InferenceRequest, IndexRequest, LoadRequest, BudgetRequest)
