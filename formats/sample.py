"""The hard-sample record (docs/samples.md): what an appliance sends with each sample, and the AppStore's
inbox checks. One declaration, used by the appliance to build the record and by the inbox to read it::

    record = SampleRecord(id=uuid.uuid4().hex, device="ward-7", ts=time.time(), reason="missed_detection",
                          predictions=[Prediction(label="person", score=0.0)])  # an operator's report: no box
    raw = record.to_json()
    SampleRecord.parse(raw, "meta")  # raises FormatError naming the key

A prediction has a box only where the model located something: a classification result, a telemetry
score and an operator's "something was missed here" have none (``box`` is null). Unknown keys are ignored
on reading, so an AppStore accepts records from appliances newer than itself.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from formats.errors import parse_json_document

Reason = Literal["near_threshold", "false_positive", "missed_detection", "random", "class"]
REASONS: tuple[str, ...] = get_args(Reason)
SAMPLE_ID_PATTERN = r"^[A-Za-z0-9_-]{8,64}$"

Unit = Annotated[float, Field(ge=0, le=1)]


class _Lenient(BaseModel):
    # a newer appliance may send more than this AppStore knows; extra keys are kept in the file, not refused
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True, allow_inf_nan=False)


class Prediction(_Lenient):
    """What the model said (or the operator reported) on the frame."""

    label: str
    score: float  # 0..1 for detections and classes; an anomaly or regression score may be any finite number
    box: tuple[Unit, Unit, Unit, Unit] | None = None  # (x1, y1, x2, y2) in 0..1 of the frame; None: no location


class ImageInfo(_Lenient):
    """The JPEG sent beside the record, so that the inbox can check it arrived whole."""

    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    size: int = Field(alias="bytes", ge=1)
    width: int = Field(ge=1)
    height: int = Field(ge=1)


class SampleRecord(_Lenient):
    """``meta``: one frame a model was unsure about or got wrong, and what it predicted there."""

    schema_version: Literal[1] = Field(default=1, alias="schema")
    id: str = Field(pattern=SAMPLE_ID_PATTERN)
    device: str
    site: str = ""
    app: str = ""
    app_version: str = ""
    model: str = ""
    source: str = ""
    ts: float = Field(ge=0)  # when the frame was taken (epoch seconds)
    reason: Reason
    predictions: list[Prediction] = Field(default_factory=list)
    privacy: str = ""  # the site's upload policy when it was sent (samples.upload)
    redacted: list[str] = Field(default_factory=list)  # labels whose regions were blurred before sending
    image: ImageInfo | None = None  # null when no pixels are sent

    @classmethod
    def parse(cls, raw: bytes, where: str) -> SampleRecord:
        return parse_json_document(cls, raw, where)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)
