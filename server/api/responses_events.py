"""The Responses API's writers: a whole `response` object, or its typed event stream
(response.created, output items with their parts and deltas, response.completed)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from ..chat.request import ChatMessage
from ..engine.generation import GenerationFailed
from ..parsers.base import assemble_calls
from .serving import ChatRun, ChoiceState, SSEEvent, new_id
from .wire import dumps

if TYPE_CHECKING:
    from .openai_responses import ResponsesRequest


class ResponseWriter:
    def __init__(self, response_id: str, req: ResponsesRequest, run: ChatRun):
        self.id = response_id
        self.req = req
        self.run = run
        self.created = int(time.time())
        self.state: ChoiceState | None = None
        self._sequence = 0

    # ------------------------------------------------------------ the response object

    def body(self, status: str, output: list[dict[str, Any]],
             state: ChoiceState | None = None) -> dict[str, Any]:
        req = self.req
        body: dict[str, Any] = {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "error": None, "incomplete_details": None, "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens, "model": req.model, "output": output,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": req.reasoning.model_dump() if req.reasoning else None,
            "store": req.store is not False, "temperature": req.temperature,
            "text": {"format": {"type": "text"}} if req.text is None or req.text.format is None
            else {"format": req.text.format.model_dump(by_alias=True, exclude_none=True)},
            "tool_choice": req.tool_choice or "auto", "tools": req.tools or [],
            "top_p": req.top_p, "truncation": "disabled", "metadata": req.metadata or {},
            "usage": None,
        }
        if state is not None:
            if state.finish_reason == "length":
                body["status"] = "incomplete"
                body["incomplete_details"] = {"reason": "max_output_tokens"}
            body["usage"] = self._usage(state)
        return body

    def _usage(self, state: ChoiceState) -> dict[str, Any]:
        handle = self.run.handle
        return {"input_tokens": handle.prompt_tokens,
                "input_tokens_details": {"cached_tokens": handle.cached_tokens},
                "output_tokens": state.tokens,
                "output_tokens_details": {"reasoning_tokens": state.reasoning_tokens},
                "total_tokens": handle.prompt_tokens + state.tokens}

    def whole(self, state: ChoiceState) -> dict[str, Any]:
        self.state = state
        output: list[dict[str, Any]] = []
        if state.reasoning:
            output.append(_reasoning_item(new_id("rs_"), state.reasoning))
        if state.content or not state.tool_calls:
            output.append(_message_item(new_id("msg_"), state.content, "completed"))
        for call in assemble_calls(state.tool_calls):
            output.append(_call_item(new_id("fc_"), call["id"], call["function"]["name"],
                                     call["function"]["arguments"], "completed"))
        return self.body("completed", output, state)

    def output_messages(self) -> list[ChatMessage]:
        """This response's output as the assistant message a next turn continues from."""
        state = self.state
        if state is None:
            return []
        calls = assemble_calls(state.tool_calls)
        return [ChatMessage(role="assistant", content=state.content, tool_calls=calls or None,
                            reasoning_content=state.reasoning or None)]

    # ------------------------------------------------------------ events

    def _event(self, kind: str, **fields: Any) -> tuple[str, str]:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return kind, dumps(event)

    async def stream(self, keep: Callable[[dict[str, Any]], None]) -> AsyncIterator[SSEEvent]:
        state = self.state = ChoiceState(self.run.parsers())
        items = _Items(self._event)
        yield self._event("response.created", response=self.body("in_progress", []))
        yield self._event("response.in_progress", response=self.body("in_progress", []))
        try:
            async for deltas in self.run.handle.deltas():
                for delta in deltas:
                    parsed = state.apply(delta)
                    if parsed.reasoning:
                        for event in items.reasoning(parsed.reasoning):
                            yield event
                    if parsed.content:
                        for event in items.text(parsed.content):
                            yield event
                    for fragment in parsed.tool_calls:
                        for event in items.call(fragment):
                            yield event
        except GenerationFailed as exc:
            yield self._event("error", code="server_error", message=str(exc), param=None)
            return
        for event in items.close():
            yield event
        body = self.body("completed", items.done, state)
        keep(body)
        kind = "response.completed" if body["status"] == "completed" else "response.incomplete"
        yield self._event(kind, response=body)


class _Items:
    """The output item being streamed; a new kind of output closes it and opens the next."""

    def __init__(self, event: Callable[..., tuple[str, str]]):
        self._event = event
        self.done: list[dict[str, Any]] = []  # finished items, in output order
        self._kind: str | None = None
        self._id = ""
        self._text = ""
        self._call: tuple[str, str] = ("", "")  # call_id, name

    @property
    def _index(self) -> int:
        return len(self.done)

    def _open(self, kind: str, item: dict[str, Any]) -> list[SSEEvent]:
        events = self.close()
        self._kind, self._id, self._text = kind, item["id"], ""
        events.append(self._event("response.output_item.added", output_index=self._index,
                                  item=item))
        if kind == "message":
            events.append(self._event("response.content_part.added", item_id=self._id,
                                      output_index=self._index, content_index=0,
                                      part=_text_part("")))
        return events

    def reasoning(self, text: str) -> list[SSEEvent]:
        events = [] if self._kind == "reasoning" else self._open(
            "reasoning", {**_reasoning_item(new_id("rs_"), ""), "content": []})
        self._text += text
        events.append(self._event("response.reasoning_text.delta", item_id=self._id,
                                  output_index=self._index, content_index=0, delta=text))
        return events

    def text(self, text: str) -> list[SSEEvent]:
        events = [] if self._kind == "message" else self._open(
            "message", _message_item(new_id("msg_"), None, "in_progress"))
        self._text += text
        events.append(self._event("response.output_text.delta", item_id=self._id,
                                  output_index=self._index, content_index=0, delta=text,
                                  logprobs=[]))
        return events

    def call(self, fragment: dict[str, Any]) -> list[SSEEvent]:
        function = fragment.get("function", {})
        events: list[SSEEvent] = []
        if "id" in fragment:
            self._call = (fragment["id"], function.get("name", ""))
            events += self._open("function_call", _call_item(new_id("fc_"), *self._call, "",
                                                             "in_progress"))
        if function.get("arguments"):
            self._text += function["arguments"]
            events.append(self._event("response.function_call_arguments.delta",
                                      item_id=self._id, output_index=self._index,
                                      delta=function["arguments"]))
        return events

    def close(self) -> list[SSEEvent]:
        kind, at, text = self._kind, self._index, self._text
        if kind is None:
            return []
        self._kind = None
        events: list[SSEEvent] = []
        if kind == "reasoning":
            item = _reasoning_item(self._id, text)
            events.append(self._event("response.reasoning_text.done", item_id=self._id,
                                      output_index=at, content_index=0, text=text))
        elif kind == "message":
            item = _message_item(self._id, text, "completed")
            events.append(self._event("response.output_text.done", item_id=self._id,
                                      output_index=at, content_index=0, text=text, logprobs=[]))
            events.append(self._event("response.content_part.done", item_id=self._id,
                                      output_index=at, content_index=0, part=_text_part(text)))
        else:
            item = _call_item(self._id, *self._call, text, "completed")
            events.append(self._event("response.function_call_arguments.done",
                                      item_id=self._id, output_index=at, arguments=text,
                                      name=self._call[1]))
        events.append(self._event("response.output_item.done", output_index=at, item=item))
        self.done.append(item)
        return events


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [] if text is None else [_text_part(text)]}


def _reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [],
            "content": [{"type": "reasoning_text", "text": text}]}


def _call_item(item_id: str, call_id: str, name: str, arguments: str,
               status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}
