"""Write tests/data/vllm-0.32-models/routes.json: what vLLM 0.32's own pydantic models serialize
for /v1/messages (+count_tokens), /v1/responses (whole and streamed) and /v1/rerank, dumped the way
its routers dump them. No GPU box or reranker was at hand to capture a running vLLM, so these are
the shapes the fake vLLM is checked against (test_fake_routes.py). Run with vLLM's venv:

    ~/.cache/llmd/vllm-venv-0.32.0/bin/python tests/vllm_model_shapes.py > tests/data/vllm-0.32-models/routes.json
"""
# ruff: noqa: E501
import json
import time
from typing import Any

from pydantic import BaseModel
from vllm.entrypoints.anthropic.protocol import (
    AnthropicContentBlock,
    AnthropicContextManagement,
    AnthropicCountTokensResponse,
    AnthropicDelta,
    AnthropicMessagesResponse,
    AnthropicStreamEvent,
    AnthropicUsage,
)
from vllm.entrypoints.openai.responses import streaming_events as se
from vllm.entrypoints.openai.responses.protocol import (
    InputTokensDetails,
    OutputTokensDetails,
    ResponseCompletedEvent,
    ResponseCreatedEvent,
    ResponseInProgressEvent,
    ResponsesRequest,
    ResponsesResponse,
    ResponseUsage,
)
from vllm.entrypoints.pooling.scoring.protocol import RerankDocument, RerankResponse, RerankResult, RerankUsage
from vllm.sampling_params import SamplingParams


def dump(model: BaseModel) -> Any:
    """As the Responses router dumps (mode json, by alias)."""
    return model.model_dump(mode="json", by_alias=True)


def j(event: BaseModel) -> Any:
    """As the Anthropic stream converter dumps its events (exclude_unset)."""
    return json.loads(event.model_dump_json(exclude_unset=True))


out: dict[str, Any] = {}
req = ResponsesRequest(model="m", input="Say hello", instructions="Be brief.", max_output_tokens=8)
sp = SamplingParams(max_tokens=8, temperature=1.0, top_p=1.0)
init = ResponsesResponse.from_request(req, sp, "m", int(time.time()), [], "in_progress")
usage = ResponseUsage(input_tokens=5, input_tokens_details=InputTokensDetails(cached_tokens=0, cache_write_tokens=0, input_tokens_per_turn=[5], cached_tokens_per_turn=[0]), output_tokens=8, output_tokens_details=OutputTokensDetails(output_tokens_per_turn=[8], tool_output_tokens_per_turn=[0]), total_tokens=13)
st = se.SimpleStreamingState()
ev = [ResponseCreatedEvent(type="response.created", sequence_number=0, response=init), ResponseInProgressEvent(type="response.in_progress", sequence_number=1, response=init)]
ev += se.emit_simple_content_open(st) + se.emit_simple_content_delta(st, "t0") + se.emit_simple_content_done(st)
final = ResponsesResponse.from_request(req, sp, "m", int(time.time()), [ev[-1].item], "incomplete", usage=usage)
ev.append(ResponseCompletedEvent(type="response.completed", sequence_number=9, response=final))
out["responses"] = dump(final)
out["responses_stream"] = [(e.type, dump(e)) for e in ev]
u = AnthropicUsage(input_tokens=5, output_tokens=8)
msg = AnthropicMessagesResponse(id="chatcmpl-x", content=[AnthropicContentBlock(type="text", text="hi")], model="m", usage=u, stop_reason="max_tokens")
out["messages"] = msg.model_dump(exclude_none=True)
start = AnthropicStreamEvent(type="message_start", message=AnthropicMessagesResponse(id="x", type="message", role="assistant", content=[], model="m", stop_reason=None, stop_sequence=None, usage=AnthropicUsage(input_tokens=5, output_tokens=0)))
out["messages_stream"] = [("message_start", j(start)),
  ("content_block_start", j(AnthropicStreamEvent(index=0, type="content_block_start", content_block=AnthropicContentBlock(type="text", text="")))),
  ("content_block_delta", j(AnthropicStreamEvent(index=0, type="content_block_delta", delta=AnthropicDelta(type="text_delta", text="t0")))),
  ("content_block_stop", j(AnthropicStreamEvent(index=0, type="content_block_stop"))),
  ("message_delta", j(AnthropicStreamEvent(type="message_delta", delta=AnthropicDelta(stop_reason="max_tokens", stop_sequence=None), usage=AnthropicUsage(input_tokens=5, output_tokens=8)))),
  ("message_stop", json.loads(AnthropicStreamEvent(type="message_stop").model_dump_json(exclude_unset=True, exclude_none=True)))]
out["count_tokens"] = AnthropicCountTokensResponse(input_tokens=5, context_management=AnthropicContextManagement(original_input_tokens=5)).model_dump(exclude_none=True)
out["rerank"] = RerankResponse(id="score-x", model="m", results=[RerankResult(index=0, document=RerankDocument(text="a"), relevance_score=0.5)], usage=RerankUsage(prompt_tokens=3, total_tokens=3)).model_dump()
print(json.dumps(out))
